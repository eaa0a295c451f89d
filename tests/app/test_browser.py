"""The web app in a real browser (headless Chromium through Playwright), on the tiny random model.

Upload the sample clip, tune it, close the page while the job runs and open it again, see the loss curve, the run
folder and the samples, make a local edit of the run (which the Edit tab picks as it finishes, over an earlier one;
the source prompt is the run's), and check that the page's <video> elements load and have a duration and that the
blend mask's plays. Bad uploads must show a message, not a traceback.
`UPDATE_SCREENSHOT=1 python -m pytest tests/test_browser.py` writes the README's screenshot, docs/app.png.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
from playwright.sync_api import expect, sync_playwright
from test_app import MAX_UPLOAD_BYTES, SAMPLE_CLIP, serve_app

from tuneavideo.app.workspace import REPO

CHROMIUM = Path("/usr/bin/chromium")
pytestmark = [pytest.mark.e2e,
              pytest.mark.skipif(not CHROMIUM.exists(), reason=f"needs {CHROMIUM} (apt-get install chromium)")]
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run"]
JOB_TIMEOUT_MS = 120_000
# Resolves once the <video> has loaded its metadata (or fails on a load error); gives its duration in seconds.
VIDEO_DURATION = """async (video) => {
    if (video.readyState < 1) {
        await new Promise((resolve, reject) => {
            video.addEventListener("loadedmetadata", resolve, {once: true});
            video.addEventListener("error", () => reject(new Error("cannot load " + video.currentSrc)), {once: true});
        });
    }
    return video.duration;
}"""
# Plays the <video> (muted) until its time advances, or fails after 10 s; gives the time it got to.
VIDEO_PLAYS = """async (video) => {
    video.muted = true;
    await video.play();
    const deadline = performance.now() + 10000;
    while (video.currentTime === 0) {
        if (performance.now() > deadline) throw new Error("stuck at 0 s: " + video.currentSrc);
        await new Promise((resolve) => setTimeout(resolve, 50));
    }
    return video.currentTime;
}"""


@pytest.fixture(scope="module")
def app(tmp_path_factory) -> Iterator[tuple[str, Path]]:
    root = tmp_path_factory.mktemp("outputs")
    with serve_app(root, tmp_path_factory.mktemp("checkpoints")) as (url, _):
        yield url, root


@pytest.fixture(scope="module")
def browser():
    with sync_playwright() as driver:
        chromium = driver.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS)
        yield chromium
        chromium.close()


@pytest.fixture
def page(app, browser):
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    page.goto(app[0])
    yield page
    page.close()


def video_duration(page, selector: str) -> float:
    """The duration of the <video> inside the element `selector`, once the browser has loaded its metadata."""
    video = page.locator(f"{selector} video")
    video.wait_for(timeout=30_000)
    return video.evaluate(VIDEO_DURATION)


def test_bad_uploads_show_a_message_not_a_traceback(app, page, tmp_path):
    root = app[1]
    before = sorted(root.iterdir())
    upload = page.locator("#tune-video input[type=file]")
    too_large = tmp_path / "large.mp4"
    too_large.write_bytes(b"\0" * (MAX_UPLOAD_BYTES + 1))
    upload.set_input_files(too_large)
    expect(page.get_by_text('File(s) exceed the maximum allowed size of 976.6 Kb: "large.mp4"')).to_be_visible()

    not_a_video = tmp_path / "holiday.mp4"
    not_a_video.write_text("this is not a video")
    upload.set_input_files(not_a_video)  # refused as it arrives, in our one message, not Gradio's too
    expect(page.get_by_text("the clip 'holiday.mp4': cannot be read as a video").first).to_be_visible()
    page.wait_for_timeout(1000)
    expect(page.get_by_text("Video not playable")).to_have_count(0)
    page.get_by_label("What the clip shows").fill("a ball is moving")
    page.locator("#tune-button").click()
    expect(page.locator("#tune-status").get_by_text("the clip 'holiday.mp4': cannot be read as a video")
           ).to_be_visible()
    expect(page.get_by_text("Video not playable")).to_have_count(0)
    assert "Traceback" not in page.content()
    assert sorted(root.iterdir()) == before  # nothing was written


def test_tune_and_edit_in_the_browser(app, page, browser, tmp_path, tuned_run):
    url, root = app
    shutil.copytree(tuned_run, root / "earlier")  # a run that finished before: the Edit tab offers it, for now
    page.get_by_role("tab", name="Edit").click()
    expect(page.locator("#edit-run input")).to_have_value("earlier", timeout=10_000)
    page.get_by_role("tab", name="Tune").click()
    expect(page.get_by_text("Random weights give noise, not pictures.").first).to_be_visible()
    page.locator("#tune-video input[type=file]").set_input_files(SAMPLE_CLIP)
    page.get_by_label("What the clip shows").fill("a ball is moving")
    page.locator("#tune-settings > button").first.click()  # open the Settings accordion
    for label, value in (("Steps", 1), ("Frames", 4), ("Stride", 3), ("number input for Size (long side, px)", 64),
                         ("Sample steps", 2), ("Sample every (steps)", 1)):
        field = page.locator("#tune-settings").get_by_label(label, exact=True)  # the Edit tab has a Steps too
        field.fill(str(value))
        field.press("Tab")
    page.locator("#tune-button").click()
    status = page.locator("#tune-status")
    expect(status).to_contain_text("tune", timeout=10_000)
    job_id = status.locator("code").first.inner_text()
    assert (root / job_id / "source.mp4").is_file()

    # the job belongs to the app, not to the page: close it, open another, find the job there
    page.close()
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    page.goto(url)
    status = page.locator("#tune-status")
    expect(status).to_contain_text(job_id)
    expect(status).to_contain_text("done", timeout=JOB_TIMEOUT_MS)
    expect(status).to_contain_text(f"Run folder: {root / job_id}")
    sample_link = status.get_by_role("link", name="sample-1/a ball is moving.mp4")
    assert page.request.get(url + sample_link.get_attribute("href")).body() == (
        root / job_id / "samples" / "sample-1" / "a ball is moving.mp4").read_bytes()
    assert video_duration(page, "#tune-sample") > 0
    expect(page.locator("#tune-loss canvas, #tune-loss svg").first).to_be_visible()  # the curve of the one step
    links = page.locator("#tune-samples a")
    expect(links).to_have_text(["sample-1/a ball is moving.gif", "sample-1/a ball is moving.mp4", "sample-1.gif"])

    page.get_by_role("tab", name="Edit").click()
    expect(page.locator("#edit-run input")).to_have_value(f"{job_id} · a ball is moving", timeout=10_000)
    page.get_by_label("New prompts, one per line").fill("a red ball is moving")
    page.locator("#edit-local > button").first.click()  # open the Local edit part
    page.locator("#local-on input").check()
    expect(page.get_by_label("Guidance scale")).to_have_value("7.5")  # Video-P2P's
    expect(page.locator("#local-source textarea")).to_have_value("a ball is moving")  # the run's tuned prompt
    page.locator("#local-blend textarea").fill("ball")
    page.locator("#edit-button").click()
    edit_status = page.locator("#edit-status")
    expect(edit_status).to_contain_text("done", timeout=JOB_TIMEOUT_MS)
    assert video_duration(page, "#edit-video") == pytest.approx(0.5, abs=0.15)  # 4 frames at 8 fps
    assert video_duration(page, "#edit-side") > 0
    assert video_duration(page, "#edit-inversion") == pytest.approx(0.5, abs=0.15)
    assert video_duration(page, "#edit-mask") == pytest.approx(0.5, abs=0.15)
    assert page.locator("#edit-mask video").evaluate(VIDEO_PLAYS) > 0
    links = page.locator("#edit-files a")
    expect(links).to_have_count(5)
    names = links.evaluate_all("links => links.map(link => link.getAttribute('download'))")
    assert sorted(names) == ["a red ball is moving.gif", "a red ball is moving.inversion.mp4",
                             "a red ball is moving.mask.mp4", "a red ball is moving.mp4",
                             "a red ball is moving.side-by-side.mp4"]
    shot = REPO / "docs" / "app.png" if os.environ.get("UPDATE_SCREENSHOT") else tmp_path / "app.png"
    shot.parent.mkdir(exist_ok=True)
    page.screenshot(path=shot, full_page=True)
    assert shot.stat().st_size > 10_000
    page.close()
