"""Fixtures shared by the test modules."""

import pytest
import torch


def pytest_collection_modifyitems(config, items):
    """Tests marked `cuda` skip, with the reason, where no CUDA GPU is visible."""
    if torch.cuda.is_available():
        return
    why = ("no CUDA GPU visible: torch is the CPU build" if torch.version.cuda is None else "no CUDA GPU visible")
    skip = pytest.mark.skip(reason=f"{why} (on a GPU machine: bash scripts/gpu_check.sh)")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def one_thread():
    """Tiny models on one thread: more threads only add synchronization (and on a busy machine,
    long spin waits). Modules opt in with pytestmark = pytest.mark.usefixtures("one_thread")."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def native_extension():
    """The compiled native extension (nanomoe/kernels/csrc); the test is skipped where it cannot be built."""
    from nanomoe.kernels import extension as build

    extension = build.load_extension()
    if extension is None:
        pytest.skip(f"the native kernels did not build: {build.build_error()}")
    return extension


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory):
    """A small built-in story corpus with a 512-token BPE tokenizer, prepared once per session."""
    from nanomoe.data import prepare_data

    return prepare_data("builtin:0.4", tmp_path_factory.mktemp("tiny-data") / "stories", vocab_size=512,
                        progress=False)


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory, tiny_data):
    """A finished debug-preset run with checkpoints at steps 2 and 4 (latest and best: step 4),
    trained once per session; tests copy it (hostile_helpers.copy_run) before changing anything."""
    from nanomoe.cli import main

    run = tmp_path_factory.mktemp("tiny-run") / "run"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("NANOMOE_NATIVE", "0")  # the same Python paths the CLI tests run (hostile_helpers.cli_env)
        code = main(["train", "--preset", "debug", "--recipe", "debug", "--data", str(tiny_data), "--out", str(run),
                     "--max-steps", "4", "--no-progress", "--set", "block_size=32", "--set", "save_every=2",
                     "--set", "eval_every=4", "--set", "keep_last=5", "--set", "samples=0", "--set", "log_every=1"])
    assert code == 0
    return run


class BrowserPage:
    """A Playwright page in the system's headless Chromium, with what it logged and fetched."""

    def __init__(self, page):
        self.page = page
        self.errors: list[str] = []  # console errors and uncaught exceptions
        self.requests: list[str] = []  # every URL the page asked for
        page.on("console", lambda m: self.errors.append(m.text) if m.type in ("error", "assert") else None)
        page.on("pageerror", lambda e: self.errors.append(str(e)))
        page.on("request", lambda r: self.requests.append(r.url))


@pytest.fixture
def browser_page():
    """A fresh page in Debian's Chromium driven by Playwright (no browser download: the system one
    is launched by path); the test is skipped where either is missing."""
    import os
    import shutil

    chromium = next((p for p in ("/usr/bin/chromium", shutil.which("chromium"), shutil.which("chromium-browser"))
                     if p and os.path.exists(p)), None)
    if chromium is None:
        pytest.skip("Chromium is not installed (apt-get install -y chromium)")
    sync_api = pytest.importorskip("playwright.sync_api", reason="pip install playwright (the dev extra)")
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=chromium, args=["--no-sandbox", "--disable-gpu"])
        try:
            yield BrowserPage(browser.new_page(viewport={"width": 1100, "height": 760}))
        finally:
            browser.close()
