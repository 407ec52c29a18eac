"""Drive the budget explorer in a real headless Chromium: serve it, open the page, move the budget, generate or
classify, and take screenshots. The browser tests use these helpers; run on its own, the script takes the
screenshots of docs/explorer.md:

    python scripts/explorer_browser.py outputs/listops outputs/bench/lm/essm --output docs/explorer

Needs Debian's `chromium` and `chromium-driver` (scripts/setup_browser.sh installs them) and selenium.
"""

import argparse
import contextlib
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMEDRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"


def browser_missing() -> str | None:
    """Why the browser cannot run here, or None when it can."""
    missing = [path for path in (CHROMIUM, CHROMEDRIVER) if not Path(path).is_file()]
    return f"{', '.join(missing)} not found: run scripts/setup_browser.sh" if missing else None


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@contextlib.contextmanager
def served(command: list[str], port: int, env=None, cwd=None, timeout=180):
    """Runs a server `command` until the block ends; yields its URL once it answers on 127.0.0.1:`port`."""
    url = f"http://127.0.0.1:{port}/"
    log = Path(os.environ.get("TMPDIR", "/tmp")) / f"essm-explore-{port}.log"
    with open(log, "w") as output:
        server = subprocess.Popen(command, env=env, cwd=cwd, stdout=output, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + timeout
        while True:
            if server.poll() is not None:
                raise RuntimeError(f"{command[0]} exited with {server.returncode}:\n{log.read_text()[-3000:]}")
            with contextlib.suppress(OSError):
                with urllib.request.urlopen(url, timeout=5) as response:
                    if response.status == 200:
                        break
            if time.monotonic() > deadline:
                raise TimeoutError(f"{command[0]} did not answer on {url} within {timeout} s:\n{log.read_text()[-3000:]}")
            time.sleep(0.5)
        yield url
    finally:
        server.terminate()
        try:
            server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()


def explore_command(model, port: int, *options) -> list[str]:
    """The console command a user runs (installed by `pip install -e .`)."""
    return [shutil.which("essm-explore") or "essm-explore", str(model), "--port", str(port), *map(str, options)]


class ExplorerPage:
    """The explorer's page in headless Chromium, addressed by the elem_ids the app gives its components."""

    def __init__(self, url: str, width=1400, height=1400, timeout=60):
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service

        options = webdriver.ChromeOptions()
        options.binary_location = CHROMIUM
        for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                         f"--window-size={width},{height}"):
            options.add_argument(argument)
        self.driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
        self.timeout = timeout
        self.driver.get(url)
        self.wait_until(lambda: self.find("#budget input[type=number]"), "the page to load")

    def close(self):
        self.driver.quit()

    # --- finding and waiting ---

    def find(self, css: str):
        from selenium.webdriver.common.by import By

        found = self.driver.find_elements(By.CSS_SELECTOR, css)
        return found[0] if found else None

    def wait_until(self, condition, what: str):
        deadline = time.monotonic() + self.timeout
        while time.monotonic() < deadline:
            with contextlib.suppress(Exception):  # an element replaced while read: ask again
                if result := condition():
                    return result
            time.sleep(0.2)
        raise TimeoutError(f"waited {self.timeout} s for {what}")

    def text(self, elem_id: str) -> str:
        return self.find(f"#{elem_id}").text

    def value(self, elem_id: str) -> str:
        """The text of a Textbox."""
        return self.find(f"#{elem_id} textarea").get_property("value")

    def top_label(self, elem_id: str) -> str:
        """The most likely label a Label component shows."""
        return self.find(f"#{elem_id} [data-testid=label-output-value]").text

    def curve_image(self) -> str:
        return self.find("#curve img").get_attribute("src")

    # --- acting ---

    def set_number(self, elem_id: str, value, attempts=3):
        """Types `value` into a slider's number box, as a user does; the slider follows when the box loses focus.
        Typing again when the slider did not follow: a page still starting up can miss the first keys."""
        from selenium.webdriver.common.keys import Keys

        for _ in range(attempts):
            box = self.find(f"#{elem_id} input[type=number]")
            box.send_keys(Keys.CONTROL, "a")
            box.send_keys(str(value), Keys.TAB)
            deadline = time.monotonic() + 5
            while time.monotonic() < deadline:
                if float(self.find(f"#{elem_id} input[type=range]").get_property("value")) == float(value):
                    return
                time.sleep(0.1)
        raise TimeoutError(f"the slider {elem_id} did not take the value {value}")

    def type_text(self, elem_id: str, text: str):
        from selenium.webdriver.common.keys import Keys

        box = self.find(f"#{elem_id} textarea")
        box.send_keys(Keys.CONTROL, "a")
        box.send_keys(Keys.DELETE)
        if text:
            box.send_keys(text)

    def click(self, elem_id: str):
        target = self.find(f"#{elem_id} input[type=checkbox]") or self.find(f"#{elem_id}")
        target.click()

    def upload(self, elem_id: str, path):
        self.find(f"#{elem_id} input[type=file]").send_keys(str(Path(path).resolve()))

    def error_message(self) -> str:
        """The text of the error the page shows, once it shows one; the message is then closed."""
        text = self.wait_until(lambda: self.find("[data-testid=toast-text]").text, "an error message")
        for close in self.driver.find_elements("css selector", "[data-testid=toast-close]"):
            with contextlib.suppress(Exception):
                close.click()
        self.wait_until(lambda: self.find("[data-testid=toast-text]") is None, "the error message to close")
        return text

    def screenshot(self, path):
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        self.driver.save_screenshot(str(path))


@contextlib.contextmanager
def explorer_page(model, *options):
    """`essm-explore MODEL` served on a free port, and its page open in Chromium, until the block ends."""
    port = free_port()
    with served(explore_command(model, port, *options), port) as url:
        page = ExplorerPage(url)
        try:
            yield page
        finally:
            page.close()


# --- the screenshots of docs/explorer.md ---------------------------------------------------------------------------


def show_language_model(page: ExplorerPage, budget: int, second: int, prompt: str, new_tokens: int):
    page.set_number("budget", budget)
    page.wait_until(lambda: page.text("budget-summary").startswith(f"k={budget}:"), "the budget summary")
    page.set_number("second-budget", second)
    page.set_number("new-tokens", new_tokens)
    page.type_text("prompt", prompt)
    page.click("compare")
    page.wait_until(lambda: "peak memory" in page.text("generation-stats-second"), "both generations")


def show_classifier(page: ExplorerPage, budget: int, text: str):
    page.set_number("budget", budget)
    page.wait_until(lambda: page.text("budget-summary").startswith(f"k={budget}:"), "the budget summary")
    page.type_text("input-text", text)
    page.click("classify")
    page.wait_until(lambda: "predicts" in page.text("classification-stats"), "the prediction")


def main(argv=None):
    parser = argparse.ArgumentParser(description="Screenshots of the explorer serving each model (docs/explorer.md).")
    parser.add_argument("models", nargs="+", help="saved model folders: causal LMs and classifiers")
    parser.add_argument("--output", default="docs/explorer", help="folder for the PNG files")
    parser.add_argument("--budget", type=int, default=4, help="the budget to show (default: 4)")
    parser.add_argument("--second-budget", type=int, default=2, help="an LM's side-by-side budget (default: 2)")
    parser.add_argument("--prompt", default="The king said to the queen")
    parser.add_argument("--classify", default="[MAX 2 9 [MIN 4 7 ] 0 ]", help="the classifier's input")
    args = parser.parse_args(argv)
    if reason := browser_missing():
        parser.exit(2, f"{parser.prog}: error: {reason}\n")
    for model in args.models:
        with explorer_page(model) as page:
            if page.find("#prompt"):
                show_language_model(page, args.budget, args.second_budget, args.prompt, 48)
            else:
                show_classifier(page, args.budget, args.classify)
            path = Path(args.output) / f"{Path(model).name}.png"
            page.screenshot(path)
            print(f"wrote {path}")


if __name__ == "__main__":
    sys.exit(main())
