"""Headless Chromium against a real run: Orthanc routes a chest radiograph and a CT to
the node, a caller not on the allow-list is refused; then the status page must show
those jobs and the refused association, and OHIF (npm @ohif/app's built viewer,
served against Orthanc's DICOMweb) must list the SEG, SR and SC series, load the SEG, and
load the TID 1500 SR showing its measurement (the area).

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

from node.demo.pacs import free_port
from tests.browser.ohif_server import OHIF_VERSION, OhifServer, ohif_dist
from tests.conftest import RUN_NOTES
from tests.forced_checkpoint import forced_checkpoint
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
    # a checkpoint that finds a pneumothorax in every image: the SR has a measurement to show
    checkpoint = forced_checkpoint(work / "forced-positive", positive=True)
    config = base_node_config(
        work,
        destinations=[{"name": "pacs", "ae_title": orthanc.ae_title, "host": "127.0.0.1", "port": orthanc.dicom_port}],
        checkpoint=checkpoint,
        model={"device": "cpu", "tta": False},
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
    # pynetdicom gives up on an answer after 30 s and aborts; a node busy with its first
    # inferences on a loaded 2-core machine can take longer to answer than that
    ae.acse_timeout = ae.network_timeout = 120
    ae.add_requested_context(Verification)
    assoc = ae.associate("127.0.0.1", node.port, ae_title=node.ae_title)
    if assoc.is_established:
        assoc.release()
    assert assoc.is_rejected, ("a caller not on the allow-list must be rejected; the association was "
                               + ("accepted" if assoc.is_established else "aborted (no answer in 120 s)"))


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


def _severe_errors(console: list[str]) -> list[str]:
    """The TypeErrors among console lines (:func:`_console`): OHIF's failures on an object."""
    return [line for line in console if line.startswith("SEVERE ") and "TypeError" in line]


def test_status_page_renders_the_jobs_of_a_run(run: Run, browser: Any) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    browser.get(f"{run.http_url}/")  # the sign-in form; the token becomes a cookie, never part of a URL
    browser.find_element(By.ID, "token").send_keys(TOKEN)
    browser.find_element(By.CSS_SELECTOR, "#login button").click()
    WebDriverWait(browser, 30).until(lambda driver: driver.find_elements(By.ID, "jobs-by-status"))
    assert "token" not in browser.current_url
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


def test_ohif_lists_the_outputs_and_loads_the_seg(run: Run, ohif: OhifServer, browser: Any) -> None:
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    browser.get(f"{ohif.url}/viewer?StudyInstanceUIDs={run.study_uid}")
    wait = WebDriverWait(browser, 120, poll_frequency=0.5)

    def series_list(driver: Any) -> dict[str, tuple[str, str]] | None:
        """Series number -> (modality, description), read per thumbnail (a PR thumbnail has
        no description label, so the page-wide label lists do not line up)."""
        listed = {}
        for thumbnail in driver.find_elements(By.CSS_SELECTOR, "[data-series]"):
            modality = thumbnail.find_elements(By.CSS_SELECTOR, '[data-cy="series-modality-label"]')
            description = thumbnail.find_elements(By.CSS_SELECTOR, '[data-cy="series-description-label"]')
            listed[thumbnail.get_attribute("data-series")] = (
                modality[0].text if modality else "", description[0].text if description else "")
        return listed if {"9901", "9902", "9903"} <= set(listed) else None

    listed = wait.until(series_list)
    assert listed["9901"][0] == "SEG" and listed["9901"][1].startswith("PTX SEG"), listed
    assert listed["9902"][0] == "OT" and listed["9902"][1].startswith("PTX OVERLAY"), listed  # the SC overlay
    assert listed["9903"][0] == "SR" and listed["9903"][1].startswith("PTX SR"), listed
    assert "DX" in {modality for modality, _ in listed.values()}  # the source radiograph
    for skip in browser.find_elements(By.XPATH, "//*[normalize-space()='Skip all']"):
        skip.click()  # OHIF's first-visit tour
    _screenshot(browser, "ohif_series_list.png")

    seg_thumbnail = browser.find_element(By.CSS_SELECTOR, '[data-series="9901"]')
    ActionChains(browser).double_click(seg_thumbnail).perform()
    panel_open = False
    deadline = time.monotonic() + 90
    while "Pneumothorax" not in browser.page_source:
        assert time.monotonic() < deadline, f"the SEG never loaded in OHIF: {_severe_errors(_console(browser))}"
        for yes in browser.find_elements(By.XPATH, "//button[normalize-space()='Yes']"):
            yes.click()  # "Do you want to open this Segmentation?"
        if not panel_open:
            browser.find_element(By.CSS_SELECTOR, '[data-cy="panelSegmentation-btn"]').click()
            panel_open = True  # lists the loaded SEG's segments by label
        time.sleep(0.5)
    severe = _severe_errors(_console(browser))  # read once: reading empties the console
    assert not severe, severe
    _screenshot(browser, "ohif_seg_loaded.png")


def test_ohif_loads_the_sr_and_shows_its_area(run: Run, ohif: OhifServer, browser: Any) -> None:
    """OHIF 3.13 opens the SR in its SR viewport on the referenced radiograph; it should draw
    the outline with the NUM values as the label ("Area: 1234.00 mm2"). Screenshot and
    console lines stay in tests/artifacts."""
    done = next(j for j in run.jobs if j.status == "DONE")
    assert done.positive and done.area_mm2 and done.sr_sop_instance_uid, (done.positive, done.area_mm2)
    expected = f"{done.area_mm2:.2f}"  # one region; OHIF prints NUM values with two decimals
    browser.get(f"{ohif.url}/viewer?StudyInstanceUIDs={run.study_uid}")
    _open_sr_viewport(browser, '[data-series="9903"]')
    shown, redraws = _wait_for_labels(browser, [expected], need=1)
    _screenshot(browser, "ohif_sr_loaded.png")
    console = _keep_console(browser, "ohif_sr_console.txt")
    severe = _severe_errors(console)
    assert not severe, severe
    assert shown, (f"OHIF 3.13 opened the SR viewport but shows no label with the SR's area ({expected} mm2), "
                   f"not even after {redraws} redraw(s); console in tests/artifacts/ohif_sr_console.txt")


def _console(driver: Any) -> list[str]:
    """The browser console's lines since the last read ("LEVEL message"): reading empties it."""
    return [f"{e['level']} {e['message']}" for e in driver.get_log("browser")]


def _keep_console(driver: Any, name: str) -> list[str]:
    """:func:`_console`, also written to tests/artifacts/``name``."""
    console = _console(driver)
    (ARTIFACTS / name).write_text("\n".join(console) + "\n")
    return console


def _wait_for_labels(browser: Any, labels: list[str], need: int, timeout: float = 60,
                     redraw_every: float = 15) -> tuple[list[str], int]:
    """Wait until at least ``need`` of ``labels`` are on the page; return those shown and how
    many redraws it took.

    OHIF 3.13's SR viewport adds the SR's annotations while it is still loading the image, and
    its DICOMSRDisplayTool draws nothing while the viewport has no image actor yet; on a busy
    machine (CI) no later render comes, so the image shows without the outline until something
    redraws the viewport (a zoom, a pan, a resize: what a reader does anyway). Seen here with
    three CPU burners: the labels appeared at once after a window resize. So after
    ``redraw_every`` seconds with too few labels the window is resized by a few pixels and back,
    which makes OHIF redraw; the labels must then be there."""
    deadline = time.monotonic() + timeout
    next_redraw = time.monotonic() + redraw_every
    redraws = 0
    while True:
        page = browser.page_source
        assert "Something went wrong" not in page, f"OHIF failed on the SR: {_console(browser)[-20:]}"
        shown = [label for label in labels if label in page]
        if len(shown) >= need or time.monotonic() > deadline:
            RUN_NOTES.append(f"OHIF SR labels: {len(shown)} of {len(labels)} shown after "
                             f"{redraws} redraw(s) of the viewport")
            return shown, redraws
        if time.monotonic() > next_redraw:
            size = browser.get_window_size()
            browser.set_window_size(size["width"] - 8, size["height"])
            time.sleep(0.5)
            browser.set_window_size(size["width"], size["height"])
            redraws += 1
            next_redraw = time.monotonic() + redraw_every
        time.sleep(1)


def _open_sr_viewport(browser: Any, sr_series: str, timeout: float = 120) -> None:
    """Double-click the SR's thumbnail until OHIF shows its SR viewport; fail on OHIF's error
    page, or after ``timeout`` with a screenshot and the console's last lines.

    The thumbnail list is re-rendered while the study's metadata streams in: a double-click
    that lands on a replaced element does nothing, so it is repeated every 15 s."""
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By

    deadline = time.monotonic() + timeout
    while not browser.find_elements(By.CSS_SELECTOR, sr_series):
        assert time.monotonic() < deadline, "OHIF never listed the SR series"
        time.sleep(0.5)

    def sr_viewport() -> bool:
        assert "Something went wrong" not in browser.page_source, f"OHIF failed on the SR: {_console(browser)[-20:]}"
        for yes in browser.find_elements(By.XPATH, "//button[normalize-space()='Yes']"):
            yes.click()  # "Track measurements for this series?"
        badges = browser.find_elements(By.CSS_SELECTOR, '[data-cy^="ModalityLoadBadge"]')
        return any("SR" in badge.text for badge in badges)

    while not sr_viewport():
        if time.monotonic() > deadline:
            shot = _screenshot(browser, "ohif_sr_timeout.png")
            pytest.fail(f"OHIF never showed the SR viewport (screenshot {shot}): {_console(browser)[-20:]}")
        for skip in browser.find_elements(By.XPATH, "//*[normalize-space()='Skip all']"):
            skip.click()  # OHIF's first-visit tour, which swallows clicks while it shows
        thumbnails = browser.find_elements(By.CSS_SELECTOR, sr_series)
        if thumbnails:
            ActionChains(browser).double_click(thumbnails[0]).perform()
        for _ in range(30):
            time.sleep(0.5)
            if sr_viewport():
                break


def test_ohif_opens_a_two_region_sr_and_shows_each_area(
    run: Run, ohif: OhifServer, browser: Any, tmp_path: Path
) -> None:
    """A bilateral finding: the node's writers make a SEG and an SR with two regions for a copy
    of the radiograph in a study of its own, Orthanc stores them, and OHIF must open the SR
    without failing and show each region's area."""
    import highdicom as hd

    from model import source_image_from_dataset
    from node.outputs import AlgorithmInfo, OutputOptions, ReferencedSeg, build_seg, build_sr
    from tests.outputs_helpers import ellipse_mask, prediction_for

    source = pydicom.dcmread(deid_file("animals/cat.dcm"))
    source.StudyInstanceUID, source.SeriesInstanceUID = hd.UID(), hd.UID()
    source.SOPInstanceUID = source.file_meta.MediaStorageSOPInstanceUID = hd.UID()
    shape = (int(source.Rows), int(source.Columns))
    mask = ellipse_mask(shape) | ellipse_mask(shape, center=(0.72, 0.4), axes=(0.05, 0.08), angle=-20)
    prediction = prediction_for(mask, source_image_from_dataset(source).pixel_spacing_mm, score=0.93)
    assert prediction.n_components == 2
    algorithm = AlgorithmInfo(name="browser-test", version="1", checkpoint_sha256="0f" * 32, untrained=False)
    options = OutputOptions()
    seg = build_seg(source, prediction.mask, algorithm=algorithm, options=options,
                    series_instance_uid=hd.UID(), sop_instance_uid=hd.UID())
    sr = build_sr(source, prediction, algorithm=algorithm, options=options,
                  seg=ReferencedSeg(seg.SeriesInstanceUID, seg.SOPInstanceUID),
                  series_instance_uid=hd.UID(), sop_instance_uid=hd.UID())
    for name, dataset in {"source": source, "seg": seg, "sr": sr}.items():
        dataset.save_as(tmp_path / f"{name}.dcm", enforce_file_format=True)
        run.orthanc.upload(tmp_path / f"{name}.dcm")

    def content_items(item: Any) -> Iterator[Any]:
        for child in item.get("ContentSequence", []):
            yield child
            yield from content_items(child)

    areas = sorted(float(item.MeasuredValueSequence[0].NumericValue) for item in content_items(sr)
                   if "MeasuredValueSequence" in item
                   and item.ConceptNameCodeSequence[0].CodeValue == "42798000")  # SCT Area
    assert len(areas) == 3, areas  # the whole finding and each region

    browser.get(f"{ohif.url}/viewer?StudyInstanceUIDs={source.StudyInstanceUID}")
    _open_sr_viewport(browser, f'[data-series="{options.sr_series_number}"]')
    shown, redraws = _wait_for_labels(browser, [f"{area:.2f}" for area in areas], need=2)
    _screenshot(browser, "ohif_sr_two_regions.png")
    console = _keep_console(browser, "ohif_sr_two_regions_console.txt")
    assert "Something went wrong" not in browser.page_source, f"OHIF failed on the SR: {console[-20:]}"
    assert len(shown) >= 2, f"OHIF showed {shown} of the areas {areas} after {redraws} redraw(s): {console[-20:]}"
