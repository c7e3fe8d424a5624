r"""A picture of demo.py's page, taken by headless Chromium, for anyone to look at (the README shows it).
Run by hand, once; not a test (pytest collects only test_*.py), and CI has no browser.

    apt-get install -y chromium   # Debian's package
    python tests/screenshot_demo.py --model runs/readme/sft/model --video runs/readme/data/videos/synth00312.mp4 \
        --query "the red triangle is visible" --out docs/img/demo.png \
        --demo-args="--nframes 16 --max-pixels 3136 --min-pixels 3136 --max-new-tokens 200"

It starts demo.py on a free 127.0.0.1 port with --video and --query (the page opens with their answer)
the way tests/test_demo.py does, waits until the server is up, has Chromium load the page and run it
for --wait seconds of page time, saves the picture (as a palette PNG, to keep it small) and stops the
demo. The browser needs no network but the local page.
"""
import argparse
import shlex
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

# tests/ is on sys.path (this script's folder); conftest puts the repo there too, as under pytest.
import conftest  # noqa: F401
from test_demo import running_demo


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="model directory for demo.py")
    ap.add_argument("--video", required=True, help="the video the page opens with")
    ap.add_argument("--query", required=True, help="the query the page opens with, answered")
    ap.add_argument("--out", default="docs/img/demo.png", help="where to write the PNG")
    ap.add_argument("--demo-args", default="", help="more flags for demo.py, in one string (e.g. the video flags)")
    ap.add_argument("--size", default="1280,820", help="browser window WIDTH,HEIGHT in pixels")
    ap.add_argument("--wait", type=float, default=10.0, help="seconds of page time before the picture is taken")
    ap.add_argument("--chromium", default=shutil.which("chromium") or shutil.which("chromium-browser"),
                    help="the browser binary (default: chromium on PATH)")
    a = ap.parse_args()
    if not a.chromium:
        sys.exit("error: no chromium on PATH: apt-get install -y chromium (or pass --chromium)")

    demo = ["--model", a.model, "--video", a.video, "--query", a.query, *shlex.split(a.demo_args)]
    with tempfile.TemporaryDirectory() as tmp, running_demo(demo, Path(tmp) / "demo.log") as url:
        with tempfile.TemporaryDirectory() as profile:  # a fresh profile: nothing from earlier runs
            raw = Path(profile) / "shot.png"
            subprocess.run([a.chromium, "--headless", "--no-sandbox", "--disable-gpu",
                            "--disable-background-networking", "--disable-component-update", "--disable-sync",
                            "--no-first-run", "--hide-scrollbars",
                            f"--user-data-dir={profile}", f"--window-size={a.size}",
                            f"--virtual-time-budget={int(a.wait * 1000)}", f"--screenshot={raw}", url],
                           check=True, capture_output=True, timeout=300)
            from PIL import Image
            with Image.open(raw) as im:  # 256 colours are plenty for a page of flat widgets: ~5x smaller
                Path(a.out).parent.mkdir(parents=True, exist_ok=True)
                im.convert("RGB").quantize(256).save(a.out, optimize=True)
        print(f"wrote {a.out} ({Path(a.out).stat().st_size // 1024} KB) from {url}")


if __name__ == "__main__":
    main()
