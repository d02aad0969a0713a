#!/usr/bin/env python3
"""Render a run's report.html in headless Chromium and check that the page works.

    python3 tools/check_report.py                 # build tightfit, train a tiny model, check its report
    python3 tools/check_report.py runs/sentiment  # check an existing run's report
    python3 tools/check_report.py --build-dir build-rel --out /tmp/report-check

Without a run directory it builds tightfit, writes a tiny random model (tightfit init --config
tiny) and a small JSONL dataset, fine-tunes it with an eval set, stops the run with SIGTERM part
way and resumes it (so the report is that of a resumed run), and checks that metrics.jsonl logged
the eval before training at step 0 once.

The checks, in Chromium (Debian: apt-get install chromium; run as root it needs --no-sandbox,
which this passes):
- the page's script ran without errors: no console messages, and <body data-charts-ready="N">
  with N the number of plots, and a readout under every chart;
- the hover readout works: a mouse move dispatched at the centre of the first visible plot makes
  the readout name a step and the train loss there;
- the screenshot is not blank and every chart's SVG was drawn: each series' legend colour is in
  it (so the window, --height, must be tall enough for all four charts).

Prints the screenshot's path (OUT/report.png). Run by hand; not part of CI.
"""
import argparse
import json
import os
import re
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import time
import zlib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# The legend colours render_report gives each series (src/train/report.cpp).
SERIES_COLOURS = {
    "train loss": (0x1F, 0x77, 0xB4),
    "eval loss": (0x2C, 0xA0, 0x2C),
    "tokens/s": (0x94, 0x67, 0xBD),
    "peak tracked memory": (0x8C, 0x56, 0x4B),
}

# After the report's own script: move the mouse over the middle of the first plot on show and copy
# what the readout then says into the DOM, where --dump-dom shows it.
HOVER_SCRIPT = """<script>
(() => {
  const svg = [...document.querySelectorAll("svg.plot")].find((s) => s.getBoundingClientRect().width > 0);
  const r = svg.getBoundingClientRect();
  svg.dispatchEvent(new MouseEvent("mousemove", {clientX: r.left + r.width / 2, clientY: r.top + r.height / 2}));
  document.body.dataset.hoverReadout = svg.closest("figure").querySelector(".readout").textContent;
})();
</script>
"""


def fail(msg):
    sys.exit("check_report: FAIL: " + msg)


def run(cmd, **kw):
    r = subprocess.run(cmd, **kw)
    if r.returncode != 0:
        fail(f"{' '.join(cmd)} exited {r.returncode}")


def write_data(work):
    # Short prompt/completion pairs that fit --seq-len 48 whole under the plain template.
    def record(i):
        n = i % 6 + 1
        return {"prompt": f"count to {n}", "completion": " ".join(str(k) for k in range(1, n + 1))}

    with open(os.path.join(work, "train.jsonl"), "w") as f:
        for i in range(24):
            f.write(json.dumps(record(i)) + "\n")
    with open(os.path.join(work, "eval.jsonl"), "w") as f:
        for i in range(6):
            f.write(json.dumps(record(i)) + "\n")


def step_lines(metrics):
    if not os.path.exists(metrics):
        return 0
    with open(metrics) as f:
        return sum(1 for line in f if line.startswith('{"step"'))


def tiny_run(build_dir, work, steps):
    run(["cmake", "-S", REPO, "-B", build_dir, "-G", "Ninja", "-DCMAKE_BUILD_TYPE=Release"],
        stdout=subprocess.DEVNULL)
    run(["cmake", "--build", build_dir, "--target", "tightfit"])
    tf = os.path.join(build_dir, "tightfit")
    model, rundir = os.path.join(work, "model"), os.path.join(work, "run")
    run([tf, "init", "--config", "tiny", "--out", model, "--seed", "1"], stdout=subprocess.DEVNULL)
    write_data(work)
    args = [tf, "finetune", "--model", model, "--data", os.path.join(work, "train.jsonl"),
            "--eval-data", os.path.join(work, "eval.jsonl"), "--out", rundir, "--steps", str(steps),
            "--eval-every", "25", "--seq-len", "48", "--micro-batch", "4", "--template", "plain",
            "--lr", "2e-2", "--warmup", "10", "--lora-rank", "8", "--threads", "1"]
    log = open(os.path.join(work, "finetune.log"), "w")
    proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT)
    metrics = os.path.join(rundir, "metrics.jsonl")
    while proc.poll() is None and step_lines(metrics) < steps // 3:
        time.sleep(0.01)
    if proc.poll() is not None:
        fail(f"the run finished before it could be stopped part way; see {log.name}")
    proc.send_signal(signal.SIGTERM)
    if proc.wait() != 0:
        fail(f"the stopped run exited {proc.returncode}; see {log.name}")
    stopped_at = step_lines(metrics)
    run(args + ["--resume"], stdout=log, stderr=subprocess.STDOUT)
    print(f"trained {steps} steps, stopped by SIGTERM after {stopped_at} and resumed; log {log.name}")

    with open(metrics) as f:
        evals = [json.loads(line) for line in f if line.startswith('{"eval_step"')]
    at_zero = [e for e in evals if e["eval_step"] == 0]
    if len(at_zero) != 1:
        fail(f"{metrics}: {len(at_zero)} eval lines at step 0, want 1 (the eval before training)")
    if evals[-1]["eval_step"] != steps:
        fail(f"{metrics}: the last eval is at step {evals[-1]['eval_step']}, want {steps}")
    return rundir


def chromium():
    for name in (os.environ.get("CHROMIUM"), "chromium", "chromium-browser", "google-chrome"):
        if name and shutil.which(name):
            return shutil.which(name)
    fail("no chromium found (Debian: apt-get install -y chromium; or set CHROMIUM)")


def headless(browser, page, *extra):
    cmd = [browser, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", "--enable-logging=stderr",
           "--v=0", *extra, "file://" + os.path.abspath(page)]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    if r.returncode != 0:
        fail(f"chromium exited {r.returncode}: {r.stderr[-2000:]}")
    console = [line for line in r.stderr.splitlines() if ":CONSOLE" in line]
    if console:
        fail("the page wrote to the console (a script error?):\n" + "\n".join(console))
    return r.stdout


def png_pixels(path):
    """(width, height, rows of RGB tuples) of an 8-bit RGB or RGBA PNG."""
    with open(path, "rb") as f:
        data = f.read()
    if data[:8] != b"\x89PNG\r\n\x1a\n":
        fail(f"{path}: not a PNG")
    pos, idat = 8, b""
    while pos < len(data):
        length, kind = struct.unpack(">I4s", data[pos:pos + 8])
        body = data[pos + 8:pos + 8 + length]
        if kind == b"IHDR":
            width, height, depth, colour = struct.unpack(">IIBB", body[:10])
        elif kind == b"IDAT":
            idat += body
        pos += 12 + length
    if depth != 8 or colour not in (2, 6):
        fail(f"{path}: PNG of bit depth {depth}, colour type {colour}; expected 8-bit RGB(A)")
    bpp = 3 if colour == 2 else 4
    raw, stride = zlib.decompress(idat), width * bpp
    rows, prev = [], bytearray(stride)
    for y in range(height):
        kind, line = raw[y * (stride + 1)], bytearray(raw[y * (stride + 1) + 1:(y + 1) * (stride + 1)])
        for i in range(stride):
            a = line[i - bpp] if i >= bpp else 0
            b, c = prev[i], prev[i - bpp] if i >= bpp else 0
            if kind == 1:
                line[i] = (line[i] + a) & 255
            elif kind == 2:
                line[i] = (line[i] + b) & 255
            elif kind == 3:
                line[i] = (line[i] + (a + b) // 2) & 255
            elif kind == 4:
                p = a + b - c
                pa, pb, pc = abs(p - a), abs(p - b), abs(p - c)
                line[i] = (line[i] + (a if pa <= pb and pa <= pc else b if pb <= pc else c)) & 255
        rows.append([tuple(line[x * bpp:x * bpp + 3]) for x in range(width)])
        prev = line
    return width, height, rows


def check_screenshot(path):
    width, height, rows = png_pixels(path)
    colours = {}
    for row in rows:
        for px in row:
            colours[px] = colours.get(px, 0) + 1
    inked = width * height - colours.get((255, 255, 255), 0)
    if inked < width * height // 50:
        fail(f"{path}: the screenshot is blank ({inked} of {width * height} pixels not white)")
    missing = [name for name, rgb in SERIES_COLOURS.items() if colours.get(rgb, 0) < 20]
    if missing:
        fail(f"{path}: no {', '.join(missing)} in the screenshot: a chart did not render")
    print(f"screenshot {width}x{height}: {inked} pixels inked, every series' colour present")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("run_dir", nargs="?", help="a run directory holding report.html (default: train a tiny one)")
    ap.add_argument("--build-dir", default=os.path.join(REPO, "build"))
    ap.add_argument("--out", help="where the screenshot and the tiny run (OUT/tiny, replaced) go "
                    "(default: a new temporary directory)")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--height", type=int, default=2600, help="browser window height, px")
    a = ap.parse_args()
    out = a.out or tempfile.mkdtemp(prefix="tightfit-report-")
    os.makedirs(out, exist_ok=True)
    if a.run_dir:
        rundir = a.run_dir
    else:
        work = os.path.join(out, "tiny")
        shutil.rmtree(work, ignore_errors=True)
        os.makedirs(work)
        rundir = tiny_run(a.build_dir, work, a.steps)
    page = os.path.join(rundir, "report.html")
    with open(page) as f:
        html = f.read()
    plots = html.count('<svg xmlns="http://www.w3.org/2000/svg" class="plot')
    figures = html.count('<figure class="chart"')
    if not a.run_dir and "<th>eval loss before</th>" not in html:
        fail(f"{page}: no 'eval loss before' figure")

    browser = chromium()
    dom = headless(browser, page, "--dump-dom", "--virtual-time-budget=5000")
    m = re.search(r'data-charts-ready="(\d+)"', dom)
    if not m:
        fail(f"{page}: the page's script did not finish (no data-charts-ready on <body>)")
    if int(m.group(1)) != plots or plots == 0:
        fail(f"{page}: the script wired {m.group(1)} plots, the page has {plots}")
    readouts = dom.count('<div class="readout">')
    if readouts != figures:
        fail(f"{page}: {readouts} readouts for {figures} charts")
    print(f"script ran: {plots} plots in {figures} charts wired, no console messages")

    hover_page = os.path.join(out, "report-hover.html")
    with open(hover_page, "w") as f:
        f.write(html.replace("</body>", HOVER_SCRIPT + "</body>"))
    dom = headless(browser, hover_page, "--dump-dom", "--virtual-time-budget=5000")
    m = re.search(r'data-hover-readout="([^"]*)"', dom)
    if not m or not re.match(r"step \d+: train loss [0-9.e+-]+", m.group(1)):
        fail(f"the hover readout did not update: {m.group(1) if m else 'nothing'}")
    print(f"hover readout: {m.group(1)}")

    png = os.path.join(out, "report.png")
    if os.path.exists(png):
        os.remove(png)
    headless(browser, page, f"--screenshot={png}", f"--window-size=860,{a.height}", "--virtual-time-budget=5000")
    if not os.path.exists(png):
        fail("chromium wrote no screenshot")
    check_screenshot(png)
    print(f"check_report: OK; screenshot {png}")


if __name__ == "__main__":
    main()
