"""Screenshots of what a user sees in the MLflow UI after the demo, for docs/ui/.

Needs a running `mlflow ui` (default http://127.0.0.1:5000), Debian's Chromium and the
`playwright` package (not a project dependency: `pip install playwright`; no browser download,
it drives /usr/bin/chromium). Takes the three links `leukemia main` prints:

    python docs/ui/screenshots.py PARENT_URL COMPARE_URL CHART_URL --out docs/ui
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
    parser.add_argument("chart_url")
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

        page.goto(args.chart_url)
        page.get_by_text("matching runs").first.wait_for(timeout=30000)
        close_assistant(page)
        # The parent's row opens collapsed: its expand button is the run-name cell's first.
        page.locator("[data-component-id*='runnamecellrenderer'] >> nth=0").click()
        page.wait_for_timeout(2000)
        search = page.get_by_placeholder("Search metric charts")
        search.click()
        search.type("val_", delay=30)  # validation curves and confusion matrices
        page.wait_for_timeout(8000)
        page.screenshot(path=str(args.out / "chart-view.png"))
        browser.close()


if __name__ == "__main__":
    main()
