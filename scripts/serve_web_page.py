#!/usr/bin/env python3
"""The web page of `afm serve` in a real browser: headless Chromium (Debian's `chromium` and
`chromium-driver`) driven by selenium (PyPI `selenium`).

Usage: python serve_web_page.py BASE_URL IMAGE
Loads the page, chooses IMAGE with the file picker and presses "Describe", then drops the
image on the page (a drop event carrying the file) and asks a typed question; each time
waits for the streamed answer. Prints one JSON line; exits non-zero on failure.
"""
import base64
import json
import os
import shutil
import sys

from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import WebDriverWait


def browser():
    opts = webdriver.ChromeOptions()
    for a in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu"):
        opts.add_argument(a)
    binary = shutil.which("chromium") or shutil.which("chromium-browser")
    if binary:
        opts.binary_location = binary
    driver = shutil.which("chromedriver") or "/usr/bin/chromedriver"
    return webdriver.Chrome(service=Service(driver), options=opts)


def wait_answer(d, timeout=300):
    """Waits until the page says `done` (or shows an error); returns (answer, status)."""
    WebDriverWait(d, timeout).until(
        lambda d: "done" in d.find_element(By.ID, "status").text
        or "error" in d.find_element(By.ID, "answer").get_attribute("class"))
    return d.find_element(By.ID, "answer").text, d.find_element(By.ID, "status").text


def main():
    base, image = sys.argv[1], os.path.abspath(sys.argv[2])
    d = browser()
    out = {}
    try:
        d.get(base + "/")
        WebDriverWait(d, 60).until(lambda d: "model:" in d.find_element(By.ID, "model").text
                                   and "loading" not in d.find_element(By.ID, "model").text)
        out["model"] = d.find_element(By.ID, "model").text
        assert "text and images" in out["model"], out

        # 1. the file picker, then "Describe"
        d.find_element(By.ID, "file").send_keys(image)
        WebDriverWait(d, 30).until(lambda d: d.find_element(By.ID, "preview").is_displayed())
        d.find_element(By.ID, "describe").click()
        answer, status = wait_answer(d)
        assert answer and not answer.startswith("error"), answer
        out["describe"] = answer
        out["describe_status"] = status

        # 2. a drop event carrying the image, then a typed question (Enter)
        d.execute_script("document.getElementById('preview').src = '';")
        with open(image, "rb") as f:
            b64 = base64.b64encode(f.read()).decode()
        d.execute_script("""
            const bytes = Uint8Array.from(atob(arguments[0]), (c) => c.charCodeAt(0));
            const dt = new DataTransfer();
            dt.items.add(new File([bytes], "dropped.png", { type: "image/png" }));
            const drop = document.getElementById("drop");
            drop.dispatchEvent(new DragEvent("drop", { dataTransfer: dt, bubbles: true, cancelable: true }));
        """, b64)
        WebDriverWait(d, 30).until(
            lambda d: d.find_element(By.ID, "preview").get_attribute("src").startswith("data:image/png"))
        d.execute_script("document.getElementById('status').textContent = '';"
                         "document.getElementById('answer').textContent = '';")
        q = d.find_element(By.ID, "question")
        q.send_keys("What shapes are there?")
        q.send_keys("\n")
        answer, _ = wait_answer(d)
        assert answer and not answer.startswith("error"), answer
        out["ask"] = answer
    finally:
        d.quit()
    print(json.dumps(out))


if __name__ == "__main__":
    main()
