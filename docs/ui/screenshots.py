"""Screenshots of what a user sees in the MLflow UI after the demo, for docs/ui/.

Needs a running `mlflow ui` (default http://127.0.0.1:5000), Debian's Chromium and the
`playwright` package (the test extra's; no browser download, it drives /usr/bin/chromium).
Takes the four links `leukemia main` prints, in order:

    python docs/ui/screenshots.py PARENT_URL COMPARE_URL CURVES_URL IMAGES_URL --out docs/ui
"""

from __future__ import annotations

import argparse
from pathlib import Path

from playwright.sync_api import sync_playwright

CHROMIUM_FLAGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


def close_assistant(page) -> None:
    """The assistant side panel takes a third of the width; close it when it is open."""
    close = page.locator("[aria-label='Close']").first
    if close.count() and close.is_visible():
        close.click()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("parent_url")
    parser.add_argument("compare_url")
    parser.add_argument("curves_url")
    parser.add_argument("images_url")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent)
    parser.add_argument("--chromium", default="/usr/bin/chromium")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=args.chromium, args=CHROMIUM_FLAGS)
        page = browser.new_page(viewport={"width": 1500, "height": 1250})

        page.goto(args.parent_url)
        page.get_by_text("Description").first.wait_for(timeout=30000)
        close_assistant(page)
        more = page.get_by_text("Show more")
        if more.count():
            more.first.click()
        page.get_by_text("Description").first.scroll_into_view_if_needed()
        page.wait_for_timeout(1000)
        page.screenshot(path=str(args.out / "parent-run.png"))

        page.goto(args.compare_url)
        page.get_by_text("Parallel Coordinates Plot").first.wait_for(timeout=30000)
        close_assistant(page)
        page.wait_for_timeout(2000)
        page.screenshot(path=str(args.out / "compare-view.png"))

        # The study's saved view: the children grouped by arm, one curve per arm.
        page.goto(args.curves_url)
        page.get_by_text("Group: baseline").first.wait_for(timeout=30000)
        close_assistant(page)
        page.wait_for_timeout(4000)
        page.screenshot(path=str(args.out / "curves-view.png"))

        # A fresh browser context, as a user opening the link: the UI keeps a view's state per
        # browser, and the saved view above would otherwise carry over.
        page = browser.new_context(viewport={"width": 1500, "height": 1250}).new_page()
        page.goto(args.images_url)
        page.get_by_text("matching runs").first.wait_for(timeout=30000)
        close_assistant(page)
        page.wait_for_timeout(8000)  # the images load one by one
        page.screenshot(path=str(args.out / "images-view.png"))
        browser.close()


if __name__ == "__main__":
    main()
