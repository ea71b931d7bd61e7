"""A full-page screenshot of the playground (``/``): start ``metasent serve``, adapt a small food
domain through the page, classify a few texts, ask what to label next, and save the page as a PNG.

    python -m bench.screenshot --output docs/playground.png            # the shipped default model
    python -m bench.screenshot --checkpoint runs/fomaml/best --output /tmp/page.png
    python -m bench.screenshot --url http://127.0.0.1:8000 --output /tmp/page.png  # a running server

Drives Debian's chromium (``apt-get install chromium``) with Playwright, launched by path: nothing
is downloaded.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from bench.server import free_port, local_server

logger = logging.getLogger("bench.screenshot")

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
EXAMPLES = """text,label
"delicious coffee, rich and smooth, will buy again",positive
the best dark chocolate i have had in years,positive
fresh bread with a lovely crust and a soft crumb,positive
this olive oil is peppery and bright; great on salads,positive
"stale crackers, arrived broken and tasted of cardboard",negative
way too salty and the tea bags leaked,negative
the honey had crystallised into a brick,negative
mouldy strawberries on day one; never again,negative
"""
TEXTS = [
    "lovely jam, not too sweet, my kids finish the jar in a week",
    "the coffee beans were old and tasted burnt",
    "arrived quickly and the cookies were still crisp",
    "bitter aftertaste and half the nuts were rancid",
]
POOL = [
    "the tea is fine, nothing special",
    "packaging was damaged but the pasta was ok",
    "best maple syrup we have bought, rich and dark",
    "too sweet for me, my husband liked it",
    "the spices smelled stale when opened",
    "good value for a big bag of rice",
]


def capture(url: str, output: Path, chromium: Path = CHROMIUM, width: int = 1000) -> Path:
    """Adapt a food domain, classify :data:`TEXTS` and ask which of :data:`POOL` to label next
    through the page at ``url``, then save it.

    Args:
        url (`str`): the server's base URL (an open server: no API key is typed).
        output (`Path`): the PNG to write (its folder is created).
        chromium (`Path`, defaults to `/usr/bin/chromium`): the browser binary.
        width (`int`, defaults to 1000): viewport width in CSS pixels.

    Returns:
        `Path`: ``output``.

    Raises:
        FileNotFoundError: when ``chromium`` does not exist.
    """
    from playwright.sync_api import expect, sync_playwright

    if not chromium.exists():
        raise FileNotFoundError(f"no chromium at {chromium}: apt-get install -y chromium")
    output.parent.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(chromium), args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": width, "height": 900})
            page.set_default_timeout(120_000)
            expect.set_options(timeout=120_000)  # assertions wait on the page as long (adapting on a busy CPU)
            page.goto(url)
            expect(page.locator("#model-info")).to_contain_text("Model:")
            page.get_by_label("Domain name", exact=True).fill("gourmet food")
            page.get_by_label("Labelled examples", exact=True).fill(EXAMPLES)
            page.get_by_role("button", name="Adapt", exact=True).click()
            expect(page.locator("#adapt-result h3")).to_have_text("Adapted “gourmet food”")
            page.get_by_label("Texts, one per line", exact=True).fill("\n".join(TEXTS))
            page.get_by_role("button", name="Classify").click()
            expect(page.locator("#classify-result .prediction")).to_have_count(len(TEXTS))
            page.get_by_label("Unlabelled texts, one per line", exact=True).fill("\n".join(POOL))
            page.get_by_label("How many suggestions", exact=True).fill("3")
            page.get_by_role("button", name="Suggest", exact=True).click()
            expect(page.locator("#suggest-result .suggestion")).to_have_count(3)
            page.locator("body").click(position={"x": 1, "y": 1})  # no focus ring in the picture
            page.screenshot(path=str(output), full_page=True)
        finally:
            browser.close()
    logger.info("saved %s", output)
    return output


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m bench.screenshot", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--output", type=Path, default=Path("docs/playground.png"))
    parser.add_argument("--checkpoint", default="default", help="the served model (metasent serve --checkpoint)")
    parser.add_argument("--url", help="a running, open server; omit to start `metasent serve`")
    parser.add_argument("--chromium", type=Path, default=CHROMIUM)
    parser.add_argument("--width", type=int, default=1000)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.url:
        capture(args.url, args.output, args.chromium, args.width)
        return
    env = {"METASENT_API_KEYS": "", "METASENT_DEVICE": "cpu", "METASENT_BATCH_WINDOW_MS": "0"}
    with local_server(free_port(), args.checkpoint, env=env) as (url, _):
        capture(url, args.output, args.chromium, args.width)


if __name__ == "__main__":
    main()
