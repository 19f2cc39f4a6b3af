"""`pkd-cache serve`'s pages, as people see them: loaded in a real browser (headless Chromium, Debian's `chromium`
package) from a running server, checked by their rendered text; and the same URLs as JSON for scripts."""
import json
import re
import shutil
import subprocess
import threading
import urllib.request

import pytest

from pkd_cache.testing import wait_until

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")


@pytest.fixture
def server(tmp_path, store_path):
    from pkd_cache.commands.serve import make_server

    root = tmp_path / "served"
    root.mkdir()
    shutil.copytree(store_path, root / "sst2.zarr")
    srv = make_server(str(root), port=0, quiet=True)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    base = f"http://127.0.0.1:{srv.server_address[1]}"
    yield base
    srv.shutdown()
    srv.server_close()


def get_json(url: str) -> dict:
    with urllib.request.urlopen(urllib.request.Request(url, headers={"Accept": "application/json"})) as r:
        return json.loads(r.read())


def rendered_text(url: str, screenshot=None) -> str:
    """The page's text after Chromium loaded and rendered it (tags stripped from the DOM it dumps)."""
    args = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars"]
    if screenshot is not None:
        subprocess.run([*args, "--window-size=1400,600", f"--screenshot={screenshot}", url], capture_output=True,
                       timeout=120, check=True)
    dom = subprocess.run([*args, "--dump-dom", url], capture_output=True, text=True, timeout=120, check=True).stdout
    dom = re.sub(r"<style>.*?</style>", " ", dom, flags=re.S)
    return " ".join(re.sub(r"<[^>]+>", " ", dom).split())


@pytest.mark.subprocess
@pytest.mark.skipif(CHROMIUM is None, reason="no chromium (apt-get install chromium)")
def test_the_index_and_a_store_page_read_right_in_a_browser(server, tmp_path, teacher_dir):
    wait_until(lambda: get_json(f"{server}/?format=json")["stores"][0]["verified"] == "verified",
               "the server's background verify of the store")
    text = rendered_text(f"{server}/", screenshot=tmp_path / "index.png")
    assert (tmp_path / "index.png").stat().st_size > 1000
    for expected in ("pkd-cache stores", "sst2.zarr", "sst2", str(teacher_dir), "4 layers, hidden 32",
                     "train 160", "validation 48", "float16", "complete, verified",
                     f"pkd-cache distill --store {server}/sst2.zarr --student-layers 3"):
        assert expected in text, (expected, text)
    page = rendered_text(f"{server}/-/sst2.zarr")
    for expected in ("sst2.zarr", "teacher (its logits)", "Labels", "train", "Teacher on the dev splits",
                     "validation accuracy", '"format": "pkd-cache"'):
        assert expected in page, (expected, page)


def test_the_same_urls_answer_json(server, store_path):
    import numpy as np

    import pkd_cache

    index = get_json(f"{server}/")
    (row,) = index["stores"]
    assert row["name"] == "sst2.zarr" and row["splits"] == {"train": 160, "validation": 48}
    detail = get_json(f"{server}/-/sst2.zarr")
    store = pkd_cache.open_store(str(store_path))
    labels = store.array("validation", "labels")[:]
    accuracy = float((store.array("validation", "logits")[:].argmax(axis=1) == labels).mean())
    assert detail["teacher_dev_metric"] == {"validation": {"accuracy": pytest.approx(accuracy)}}
    counts = np.bincount(labels, minlength=2)
    assert detail["labels"]["validation"] == {"negative": int(counts[0]), "positive": int(counts[1])}
    with pytest.raises(urllib.error.HTTPError) as e:
        get_json(f"{server}/-/nothing.zarr")
    assert e.value.code == 404
