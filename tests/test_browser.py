"""The page in a real headless Chromium: upload a photo, speak (a recorded speech file as the microphone),
see frames play with their latency."""
from __future__ import annotations

import shutil
import threading
import time

import numpy as np
import pytest

pytest.importorskip("starlette", reason="the 'serve' extra is not installed")
webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed")

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
DRIVER = shutil.which("chromedriver")
pytestmark = pytest.mark.skipif(not (CHROMIUM and DRIVER),
                                reason="chromium and chromedriver are absent (apt-get install chromium chromium-driver)")


@pytest.fixture(scope="module", params=["stand-in renderer", pytest.param("real renderer", marks=pytest.mark.heavy)])
def server(request):
    """The page against the real server; by default every stage is real but the renderer (seconds per frame on
    a CPU), which a cheap deterministic stand-in replaces; the heavy variant renders for real."""
    from sadtalker_rt.models.checkpoints import WeightSource
    from sadtalker_rt.runtime.pipeline import TalkingHead
    from sadtalker_rt.serving.limits import ServeConfig
    from sadtalker_rt.serving.server import make_server

    head = TalkingHead.from_weights(WeightSource(synthetic_seed=0), size=256)
    if request.param == "stand-in renderer":
        from conftest import CheapRendererBackend

        head = TalkingHead(CheapRendererBackend(head.backend), head.size)
    uvicorn = make_server(head, "127.0.0.1", 0, ServeConfig(batch_size=1))
    thread = threading.Thread(target=uvicorn.run)
    thread.start()
    while not uvicorn.started:
        time.sleep(0.05)
    yield f"http://127.0.0.1:{uvicorn.servers[0].sockets[0].getsockname()[1]}/"
    uvicorn.should_exit = True
    thread.join(30)


def test_page_plays_frames_from_the_microphone(server, assets_dir, tmp_path):
    import soundfile
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    from sadtalker_rt import media

    speech = tmp_path / "speech.wav"        # Chromium's fake capture device reads 16-bit WAV
    soundfile.write(speech, media.load_audio(assets_dir / "bus_chinese.wav")[:4 * 16000], 16000, subtype="PCM_16")
    options = Options()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--use-fake-ui-for-media-stream",
                 "--use-fake-device-for-media-stream", f"--use-file-for-fake-audio-capture={speech}",
                 "--autoplay-policy=no-user-gesture-required"):
        options.add_argument(flag)
    browser = webdriver.Chrome(service=Service(DRIVER), options=options)
    try:
        browser.get(server)
        browser.find_element(By.ID, "photo").send_keys(str(assets_dir / "happy.png"))
        browser.find_element(By.ID, "upload").click()
        WebDriverWait(browser, 300).until(lambda b: b.find_element(By.ID, "mic").is_enabled())
        browser.find_element(By.ID, "mic").click()
        WebDriverWait(browser, 600).until(lambda b: int(b.find_element(By.ID, "frames").text) >= 2)
        latency = browser.find_element(By.ID, "latency").text
        assert latency.isdigit() and int(latency) > 0
        pixels = browser.execute_script(
            "const d = document.getElementById('video').getContext('2d').getImageData(0, 0, 256, 256).data;"
            "return Array.from(d.filter((_, i) => i % 4 === 0));")
        assert np.std(pixels) > 5, "the canvas shows no picture"
        browser.find_element(By.ID, "stop").click()
    finally:
        browser.quit()
