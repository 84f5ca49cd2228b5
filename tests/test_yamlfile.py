"""Every YAML the project reads is data: no aliases (an anchor bomb of a few hundred bytes
would expand until memory runs out), no repeated keys, a bounded size; each refusal one line
naming the file and the line."""

from __future__ import annotations

import subprocess
import sys

import pytest

from leukemia import search as search_lib
from leukemia import yamlfile
from leukemia.config import load_config

from .conftest import REPO

# Nine levels of nine: 9**9 (387 million) strings once expanded.
BOMB = "a: &a [x, x, x, x, x, x, x, x, x]\n" + "".join(
    f"{b}: &{b} [*{a}, *{a}, *{a}, *{a}, *{a}, *{a}, *{a}, *{a}, *{a}]\n"
    for a, b in zip("abcdefgh", "bcdefghi")
)


def test_plain_yaml_reads_as_safe_load_does():
    assert yamlfile.loads("a: 1\nb: [x, 2.5]\nc: {d: null}\n", "t") == {
        "a": 1,
        "b": ["x", 2.5],
        "c": {"d": None},
    }


@pytest.mark.parametrize(
    "text, says",
    [
        (BOMB, "aliases (*name) are not accepted"),
        ("a: &x 1\nb: *x\n", "line 2"),
        ("image_size: 64\nimage_size: 128\n", "key 'image_size' is given twice"),
        ("preprocess:\n  kernel_size: 3\n  kernel_size: 5\n", "line 3"),
        ("!!python/object/apply:os.system [echo]\n", "not readable YAML"),
        ("a: [1,\n", "not readable YAML"),
    ],
)
def test_refused_yaml(text, says):
    with pytest.raises(ValueError, match=r"^t is not readable YAML") as error:
        yamlfile.loads(text, "t")
    assert says in str(error.value) and "\n" not in str(error.value)


def test_a_large_file_is_refused_unread(tmp_path):
    path = tmp_path / "big.yaml"
    path.write_text("a: " + "x" * (yamlfile.MAX_BYTES + 10) + "\n")
    with pytest.raises(ValueError, match="larger than"):
        yamlfile.load(path)


@pytest.mark.parametrize("where", ["base", "choices", "bound"])
def test_an_anchor_bomb_in_a_search_space_is_one_line_not_a_memory_blowup(tmp_path, where):
    """In a separate process capped at 2 GiB: the bomb must be refused, not expanded."""
    path = tmp_path / "space.yaml"
    body = {
        "base": "base: *i\nspace:\n  channel: [gray]\n",
        "choices": "base: experiments/demo.yaml\nspace:\n  channel: *i\n",
        "bound": "base: experiments/demo.yaml\nspace:\n  phase1_lr: {low: *i, high: 1}\n",
    }[where]
    path.write_text(BOMB + body)
    code = (
        "import resource, sys\n"
        "resource.setrlimit(resource.RLIMIT_AS, (2 << 30, 2 << 30))\n"
        "from leukemia import search\n"
        "try:\n"
        f"    search.load_space({str(path)!r})\n"
        "except ValueError as error:\n"
        "    print(error); sys.exit(3)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=REPO
    )
    assert done.returncode == 3, done.stderr[-2000:]
    assert "aliases (*name) are not accepted" in done.stdout


def test_a_config_with_a_repeated_key_names_it(tmp_path):
    path = tmp_path / "twice.yaml"
    path.write_text("image_size: 64\nmodel: test_efficientnet\nimage_size: 128\n")
    with pytest.raises(ValueError, match=r"key 'image_size' is given twice.*|line 3"):
        load_config(path)
    space = tmp_path / "space.yaml"
    space.write_text("base: experiments/demo.yaml\nspace:\n  channel: [gray]\n  channel: [lab-a]\n")
    with pytest.raises(ValueError, match="key 'channel' is given twice"):
        search_lib.load_space(space)
