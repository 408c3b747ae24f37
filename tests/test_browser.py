"""Headless Chromium against a real run: Orthanc routes a chest radiograph and a CT to
the node, a caller not on the allow-list is refused; then the status page must show
those jobs and the refused association, and OHIF (npm @ohif/app's built viewer,
served against Orthanc's DICOMweb) must list the SEG and SC series and load the SEG.

Screenshots go to tests/artifacts/. Needs Debian `chromium` and `chromium-driver`,
PyPI `selenium`, and the OHIF files from tests/browser/fetch_ohif.sh.
"""

from __future__ import annotations

import shutil
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pydicom
import pytest

from node.pacs import free_port
from tests.browser.ohif_server import OHIF_VERSION, OhifServer, ohif_dist
from tests.services import (
    NodeProcess,
    Orthanc,
    base_node_config,
    deid_file,
    pydicom_file,
    require_service,
)

pytestmark = [pytest.mark.services, pytest.mark.slow]

ARTIFACTS = Path(__file__).parent / "artifacts"
TOKEN = "browser-test-token"
CHROMIUM_FLAGS = [
    "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
    "--window-size=1600,1000",
    # WebGL for OHIF's cornerstone renderer, in software (no GPU here).
    "--enable-unsafe-swiftshader", "--use-angle=swiftshader",
]


@dataclass
class Run:
    orthanc: Orthanc
    node: NodeProcess
    http_url: str
    jobs: list[Any]
    study_uid: str  # the processed radiograph's study


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Run]:
    work = tmp_path_factory.mktemp("browser-run")
    orthanc = Orthanc(work / "orthanc").start()
    http_port = free_port()
    config = base_node_config(
        work,
        destinations=[{"name": "pacs", "ae_title": orthanc.ae_title, "host": "127.0.0.1", "port": orthanc.dicom_port}],
        model={"untrained_input_size": 256},
        outputs={"negative_policy": "seg_and_sc"},
        http={"enabled": True, "port": http_port, "token": TOKEN},
    )
    config["scp"]["allowed_callers"] = [{"ae_title": orthanc.ae_title}]
    node = NodeProcess(work, config)
    try:
        node.start()
        orthanc.add_modality("ptx", node.ae_title, node.port)
        # cat.dcm: a DX chest with pixel spacing, which OHIF can place the SEG on.
        radiograph = deid_file("animals/cat.dcm")
        ct = pydicom_file("CT_small.dcm")
        orthanc.store_to_modality("ptx", [orthanc.upload(radiograph), orthanc.upload(ct)])
        _refused_association(node)
        jobs = node.wait_for_terminal(2, timeout=300)
        study_uid = pydicom.dcmread(radiograph, stop_before_pixels=True).StudyInstanceUID
        yield Run(orthanc, node, f"http://127.0.0.1:{http_port}", jobs, study_uid)
    finally:
        node.stop()
        orthanc.stop()


def _refused_association(node: NodeProcess) -> None:
    from pynetdicom import AE
    from pynetdicom.sop_class import Verification

    ae = AE(ae_title="INTRUDER")
    ae.add_requested_context(Verification)
    assoc = ae.associate("127.0.0.1", node.port, ae_title=node.ae_title)
    assert assoc.is_rejected, "a caller not on the allow-list must be rejected"


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    driver_path = shutil.which("chromedriver")
    require_service(chromium is not None, "chromium", "apt-get install chromium chromium-driver")
    require_service(driver_path is not None, "chromedriver", "apt-get install chromium-driver")
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        require_service(False, "selenium", "pip install selenium")
        raise
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    profile = tempfile.mkdtemp(prefix="ptx-chromium-")
    for flag in [*CHROMIUM_FLAGS, f"--user-data-dir={profile}"]:
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(driver_path), options=options)
    try:
        yield driver
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


def _screenshot(driver: Any, name: str) -> Path:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    path = ARTIFACTS / name
    driver.save_screenshot(str(path))
    assert path.stat().st_size > 10_000, f"screenshot {path} looks empty"
    return path


def _severe_errors(driver: Any) -> list[str]:
    return [e["message"] for e in driver.get_log("browser")
            if e["level"] == "SEVERE" and "TypeError" in e["message"]]


def test_status_page_renders_the_jobs_of_a_run(run: Run, browser: Any) -> None:
    from selenium.webdriver.common.by import By

    browser.get(f"{run.http_url}/?token={TOKEN}")
    assert "token" not in browser.current_url  # moved into a cookie by the redirect
    assert browser.find_element(By.TAG_NAME, "h1").text.startswith("ptx-node")
    by_status = {j.status: j for j in run.jobs}
    assert set(by_status) == {"DONE", "SKIPPED"}, [(j.id, j.status, j.error) for j in run.jobs]
    for job in run.jobs:
        row = browser.find_element(By.ID, f"job-{job.id}")
        cells = row.find_elements(By.TAG_NAME, "td")
        assert cells[0].text == str(job.id) and cells[1].text == job.status
    assert "modality CT is not CR or DX" in browser.find_element(By.ID, f"job-{by_status['SKIPPED'].id}").text
    done_row = browser.find_element(By.ID, f"job-{by_status['DONE'].id}").text
    assert " s" in done_row  # timings shown
    counts = {c.get_attribute("data-status"): c.text
              for c in browser.find_elements(By.CSS_SELECTOR, "#jobs-by-status td")}
    assert counts["DONE"] == "1" and counts["SKIPPED"] == "1" and counts["FAILED"] == "0"
    assert browser.find_element(By.CSS_SELECTOR, "#workers-alive b").text == "1"
    associations = browser.find_element(By.ID, "associations").text
    assert "INTRUDER" in associations and "ORTHANC" in associations
    assert "Patient" not in browser.page_source  # no patient names, not even the label
    _screenshot(browser, "status_page.png")


@pytest.fixture(scope="module")
def ohif(run: Run) -> Iterator[OhifServer]:
    dist = ohif_dist()
    require_service(dist is not None, f"OHIF viewer files (@ohif/app {OHIF_VERSION})",
                    "run tests/browser/fetch_ohif.sh")
    assert dist is not None
    server = OhifServer(dist, run.orthanc.dicomweb_url).start()
    try:
        yield server
    finally:
        server.stop()


def test_ohif_lists_and_loads_the_seg_and_sc(run: Run, ohif: OhifServer, browser: Any) -> None:
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    browser.get(f"{ohif.url}/viewer?StudyInstanceUIDs={run.study_uid}")
    wait = WebDriverWait(browser, 120, poll_frequency=0.5)

    def series_list(driver: Any) -> dict[str, str] | None:
        modalities = [e.text for e in driver.find_elements(By.CSS_SELECTOR, '[data-cy="series-modality-label"]')]
        descriptions = [e.text for e in driver.find_elements(By.CSS_SELECTOR, '[data-cy="series-description-label"]')]
        if {"SEG", "OT"} <= set(modalities) and len(descriptions) >= 3:
            return dict(zip(modalities, descriptions, strict=False))
        return None

    listed = wait.until(series_list)
    assert listed["SEG"].startswith("PTX SEG"), listed
    assert listed["OT"].startswith("PTX OVERLAY"), listed  # the SC overlay
    assert "DX" in listed  # the source radiograph
    for skip in browser.find_elements(By.XPATH, "//*[normalize-space()='Skip all']"):
        skip.click()  # OHIF's first-visit tour
    _screenshot(browser, "ohif_series_list.png")

    seg_thumbnail = browser.find_element(By.CSS_SELECTOR, '[data-series="9901"]')
    ActionChains(browser).double_click(seg_thumbnail).perform()
    panel_open = False
    deadline = time.monotonic() + 90
    while "Pneumothorax" not in browser.page_source:
        assert time.monotonic() < deadline, f"the SEG never loaded in OHIF: {_severe_errors(browser)}"
        for yes in browser.find_elements(By.XPATH, "//button[normalize-space()='Yes']"):
            yes.click()  # "Do you want to open this Segmentation?"
        if not panel_open:
            browser.find_element(By.CSS_SELECTOR, '[data-cy="panelSegmentation-btn"]').click()
            panel_open = True  # lists the loaded SEG's segments by label
        time.sleep(0.5)
    assert not _severe_errors(browser), _severe_errors(browser)
    _screenshot(browser, "ohif_seg_loaded.png")
