"""The serve playground in a real headless Chromium (Playwright): a prompt typed in streams back as
coloured token spans that follow the layer menu, hover shows every layer's experts and gate weights;
nothing is fetched from outside the server."""

from __future__ import annotations

import re

import httpx
import pytest
from playwright.sync_api import expect
from serve_helpers import live_server, save_run

pytestmark = pytest.mark.browser


def test_playground_streams_a_story_coloured_by_expert(tmp_path, browser_page):
    run = save_run(tmp_path / "moe")
    with live_server(run) as url:
        page = browser_page.page
        page.goto(url + "/")
        expect(page.locator("#model")).to_contain_text("4 experts")
        assert page.locator("#layer-select option").all_inner_texts() == ["layer 0", "layer 1"]
        page.fill("#prompt", "Once upon a time")
        page.fill("#max-tokens", "80")
        page.fill("#seed", "3")
        # the token count at every change of the story: it grows token by token while it streams
        page.evaluate("""() => { window.counts = [];
            new MutationObserver(() => window.counts.push(document.querySelectorAll('#output .tok').length))
              .observe(document.getElementById('output'), {childList: true}); }""")
        page.click("#generate")
        expect(page.locator("#status")).to_have_text(re.compile(r"^done"), timeout=60_000)
        counts = page.evaluate("window.counts")
        assert any(0 < c < counts[-1] for c in counts), counts  # part of the story was on the page before the end
        expect(page.locator("#speed")).to_contain_text("tokens/s")

        # the same request through the API: the same tokens and experts as the page shows
        body = {"prompt": "Once upon a time", "max_tokens": 80, "seed": 3, "temperature": 0.8, "top_k": 50,
                "top_p": 1, "experts": True}
        routing = httpx.post(url + "/v1/completions", json=body, timeout=60).json()["choices"][0]["routing"]
        shown = page.evaluate("""() => [...document.querySelectorAll('#output .tok')].map(t => ({
            text: t.textContent, e: Number(t.dataset.e), colour: getComputedStyle(t).backgroundColor}))""")
        assert [t["text"] for t in shown] == routing["tokens"]
        assert [t["e"] for t in shown] == [experts[0][0] for experts in routing["experts"]]
        assert "rgba(0, 0, 0, 0)" not in {t["colour"] for t in shown} and len({t["colour"] for t in shown}) >= 2

        page.select_option("#layer-select", "1")  # recoloured by the second MoE layer's first choices
        layer1 = page.evaluate("() => [...document.querySelectorAll('#output .tok')].map(t => Number(t.dataset.e))")
        assert layer1 == [experts[1][0] for experts in routing["experts"]]

        i = next(i for i, text in enumerate(routing["tokens"]) if text.strip())  # a token with width to hover
        page.locator("#output .tok").nth(i).hover()
        tip = page.locator("#tip")
        expect(tip).to_be_visible()
        e0, e1 = routing["experts"][i]
        w0, w1 = routing["weights"][i]
        expect(tip).to_contain_text(f"layer 0expert {e0[0]} ({w0[0]:.3f}) + expert {e0[1]} ({w0[1]:.3f})")
        expect(tip).to_contain_text(f"layer 1expert {e1[0]} ({w1[0]:.3f})")

        page.screenshot(path=tmp_path / "playground.png")
        assert (tmp_path / "playground.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert browser_page.errors == []
    assert [u for u in browser_page.requests if not u.startswith(url)] == []
