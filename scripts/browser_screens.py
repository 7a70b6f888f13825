#!/usr/bin/env python3
"""Screenshots drawn by a web browser, for probing how afm-tiny's reader and screen
descriptions carry over from the generator's screens (a check set, never trained on).

Renders N small HTML pages in Debian's headless Chromium (selenium + chromedriver): a
window-like dialog on a desktop, or a plain web form, in light or dark themes, in fonts the
generator never used (Liberation Sans/Serif, Noto Sans/Serif, DejaVu Sans Condensed, the
browser's default sans), with titles and button labels from a word list of this script (not
the generator's). Writes OUT/NNN.png and OUT/labels.jsonl (file, title, buttons, fields,
font, layout).

    python3 scripts/browser_screens.py OUT [N] [SEED]
"""
import json
import os
import random
import sys
import tempfile

from selenium import webdriver
from selenium.webdriver.chrome.options import Options
from selenium.webdriver.chrome.service import Service

WORDS = """amber anchor archive atlas beacon border bridge cabinet canvas caption cargo cedar
chapter circuit cloud cobalt compass copper cradle crystal dawn delta desk domain draft
ember engine estate falcon fiber folder forest frame garden glacier harbor haven ledger
lens lighthouse margin meadow mirror motion nectar notebook orbit paddle parcel pebble
pepper pillar planet plaza portal prism quarry quartz radar ribbon river rocket saddle
signal silver sketch slate spark spiral spruce summit tablet thunder timber token tower
trail vault velvet voyage willow window winter zenith""".split()
VERBS = """Open Close Start Stop Send Share Sync Apply Accept Decline Browse Upload Download
Print Refresh Rename Archive Restore Publish Preview Continue Finish Skip Join Leave Sort
Merge Split Connect Disconnect Install Remove Search Select Confirm Dismiss""".split()
FONTS = [
    "Liberation Sans",
    "Liberation Serif",
    "Noto Sans",
    "Noto Serif",
    "DejaVu Sans Condensed",
    "sans-serif",
]
LABELS = ["Name", "Email", "City", "Phone", "Company", "Folder", "Server", "Port", "Note"]
VALUES = ["Maria Lopez", "ann@example.org", "Lisbon", "555 0142", "Nordwind Ltd",
          "/srv/data", "db.local", "5432", "call back"]
THEMES = [
    # page, window, title bar, title text, text, field, field border, button, button text, accent, accent text
    ("#d9dde3", "#ffffff", "#eef0f3", "#222", "#222", "#fff", "#9aa3ad", "#e9ecef", "#222", "#2f6fdf", "#fff"),
    ("#2b2d33", "#3a3d45", "#30333a", "#eee", "#ddd", "#2b2d33", "#5a5f6b", "#4a4e58", "#eee", "#e0803a", "#fff"),
    ("#f4efe6", "#fffdf8", "#e8e1d4", "#3b2f22", "#3b2f22", "#fff", "#b9ab93", "#efe7d9", "#3b2f22", "#2e8b57", "#fff"),
    ("#123", "#1b2a3a", "#16222f", "#cfe", "#cde", "#0f1b27", "#345", "#25384c", "#def", "#4aa3ff", "#012"),
]


def title_of(rng):
    return " ".join(w.capitalize() for w in rng.sample(WORDS, rng.choice([1, 2, 2, 3])))


def button_of(rng, used):
    while True:
        b = rng.choice(VERBS) if rng.random() < 0.6 else f"{rng.choice(VERBS)} {rng.choice(WORDS).capitalize()}"
        if b not in used:
            return b


def page(rng):
    t = rng.choice(THEMES)
    font = rng.choice(FONTS)
    px = rng.choice([13, 14, 15, 16])
    title = title_of(rng)
    nb = rng.choice([1, 2, 2, 3])
    buttons = []
    for _ in range(nb):
        buttons.append(button_of(rng, buttons))
    primary = nb - 1
    nf = rng.choice([0, 1, 2, 3])
    idx = rng.sample(range(len(LABELS)), nf)
    fields = [(LABELS[i], VALUES[i]) for i in idx]
    layout = rng.choice(["dialog", "form"])
    radius = rng.choice([0, 3, 6])
    btns = "".join(
        f'<button style="background:{t[9] if i == primary else t[7]};color:{t[10] if i == primary else t[8]};'
        f'border:1px solid {t[6]};border-radius:{radius}px;padding:5px 14px;margin-left:8px;'
        f'font:inherit">{b}</button>'
        for i, b in enumerate(buttons)
    )
    rows = "".join(
        f'<div style="margin:10px 0"><div style="margin-bottom:4px">{l}</div>'
        f'<input value="{v}" style="font:inherit;color:{t[4]};background:{t[5]};border:1px solid {t[6]};'
        f'padding:4px 6px;width:240px"></div>'
        for l, v in fields
    )
    if layout == "dialog":
        body = (
            f'<div style="position:absolute;left:{rng.randint(40, 200)}px;top:{rng.randint(30, 120)}px;'
            f'width:380px;background:{t[1]};border:1px solid {t[6]};box-shadow:0 4px 16px rgba(0,0,0,.35)">'
            f'<div style="background:{t[2]};color:{t[3]};padding:7px 12px;font-weight:bold">{title}</div>'
            f'<div style="padding:6px 16px 14px;color:{t[4]}">{rows}'
            f'<div style="text-align:right;margin-top:18px">{btns}</div></div></div>'
        )
    else:
        body = (
            f'<div style="padding:24px 40px;color:{t[4]};background:{t[1]};min-height:100%">'
            f'<h2 style="margin:0 0 12px;color:{t[3]};font-size:{px + 8}px">{title}</h2>{rows}'
            f'<div style="margin-top:18px;margin-left:-8px">{btns}</div></div>'
        )
    html = (
        f'<!doctype html><html><body style="margin:0;width:720px;height:450px;background:{t[0]};'
        f'font-family:\'{font}\';font-size:{px}px;overflow:hidden">{body}</body></html>'
    )
    label = {
        "title": title,
        "buttons": buttons,
        "highlighted": buttons[primary],
        "fields": [{"label": l, "value": v} for l, v in fields],
        "font": font,
        "px": px,
        "layout": layout,
    }
    return html, label


def main():
    out = sys.argv[1]
    n = int(sys.argv[2]) if len(sys.argv) > 2 else 40
    rng = random.Random(int(sys.argv[3]) if len(sys.argv) > 3 else 7)
    os.makedirs(out, exist_ok=True)
    o = Options()
    for a in ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
              "--disable-background-networking", "--disable-component-update", "--disable-sync",
              "--hide-scrollbars", "--force-device-scale-factor=1", "--window-size=720,450"]:
        o.add_argument(a)
    o.add_argument("--user-data-dir=" + tempfile.mkdtemp())
    o.binary_location = "/usr/bin/chromium"
    d = webdriver.Chrome(service=Service("/usr/bin/chromedriver"), options=o)
    try:
        d.set_window_size(720, 450)
        # the viewport itself, whatever the window's frame takes
        d.execute_cdp_cmd(
            "Emulation.setDeviceMetricsOverride",
            {"width": 720, "height": 450, "deviceScaleFactor": 1, "mobile": False},
        )
        labels = []
        for i in range(n):
            html, label = page(rng)
            f = os.path.join(out, f"{i:03}.html")
            with open(f, "w") as h:
                h.write(html)
            d.get("file://" + os.path.abspath(f))
            png = f"{i:03}.png"
            d.save_screenshot(os.path.join(out, png))
            os.remove(f)
            labels.append({"file": png, **label})
        with open(os.path.join(out, "labels.jsonl"), "w") as h:
            for l in labels:
                h.write(json.dumps(l) + "\n")
    finally:
        d.quit()


if __name__ == "__main__":
    main()
