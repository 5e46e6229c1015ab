"""The NAG explorer in a real browser: JupyterLab on localhost, headless Chromium through Playwright.

Run all cells of a fresh copy of nbs/explore_nag.ipynb (outputs and saved widget state removed), wait for the live
widget, move the w_nag slider with the keyboard, and check that the figure changed and that no error output
appeared. A screenshot goes to runs/browser/. Every wait is bounded; JupyterLab and its kernel are always shut down."""
import json, os, re, signal, socket, subprocess, sys, time, urllib.request
from pathlib import Path
import pytest

ROOT = Path(__file__).resolve().parents[2]
SHOTS = ROOT / 'runs' / 'browser'

def free_port()->int:
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0)); return s.getsockname()[1]

def wait_http(url:str, seconds:float, proc):
    "Poll `url` until it answers 200; fail if the server exits or time runs out."
    end = time.time() + seconds
    while time.time() < end:
        if proc.poll() is not None: raise RuntimeError(f'JupyterLab exited with code {proc.returncode}')
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200: return
        except OSError: time.sleep(0.3)
    raise TimeoutError(f'{url} did not answer within {seconds} s')

def fresh_copy(src:Path, dst:Path):
    "The notebook without outputs and saved widget state, so only the live widget can show up."
    import nbformat
    nb = nbformat.read(src, as_version=4)
    for c in nb.cells:
        if c.cell_type == 'code': c.outputs, c.execution_count = [], None
    nb.metadata.pop('widgets', None)
    nbformat.write(nb, dst)

def quiet_settings(folder:Path):
    "User settings that keep JupyterLab offline and quiet (no news or update checks, no toasts over the page)."
    f = folder / '@jupyterlab' / 'apputils-extension' / 'notification.jupyterlab-settings'
    f.parent.mkdir(parents=True, exist_ok=True)
    f.write_text(json.dumps({'fetchNews': 'false', 'checkForUpdates': False}))

@pytest.fixture
def lab(tmp_path):
    "JupyterLab serving a fresh copy of explore_nag.ipynb on a free localhost port; yields its base URL."
    fresh_copy(ROOT / 'nbs' / 'explore_nag.ipynb', tmp_path / 'explore_nag.ipynb')
    quiet_settings(tmp_path / 'settings')
    port, log = free_port(), open(tmp_path / 'lab.log', 'w')
    cmd = [sys.executable, '-m', 'jupyter', 'lab', '--no-browser', '--allow-root', '--ip=127.0.0.1', f'--port={port}',
           '--ServerApp.token=', '--ServerApp.password=', '--ServerApp.disable_check_xsrf=True', f'--ServerApp.root_dir={tmp_path}',
           f'--LabApp.user_settings_dir={tmp_path / "settings"}', f'--LabApp.workspaces_dir={tmp_path / "workspaces"}']
    env = {**os.environ, 'OMP_NUM_THREADS': '1', 'JUPYTER_RUNTIME_DIR': str(tmp_path / 'runtime')}
    proc = subprocess.Popen(cmd, cwd=tmp_path, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    url = f'http://127.0.0.1:{port}'
    try:
        wait_http(f'{url}/api/status', 90, proc)
        yield url
    finally: shutdown(proc, url, log)

def shutdown(proc, url:str, log):
    "Stop the server (and with it its kernels) through its API; terminate, then kill its process group if it lingers."
    try: urllib.request.urlopen(urllib.request.Request(f'{url}/api/shutdown', method='POST'), timeout=5)
    except OSError: pass
    try: proc.wait(20)
    except subprocess.TimeoutExpired:
        proc.terminate()
        try: proc.wait(10)
        except subprocess.TimeoutExpired: os.killpg(proc.pid, signal.SIGKILL); proc.wait(10)
    log.close()

def no_tracebacks(page):
    "No stderr output with a traceback and no traceback text anywhere in the notebook's outputs."
    stderr = page.locator('.jp-RenderedText[data-mime-type="application/vnd.jupyter.stderr"]').all_inner_texts()
    assert not [t for t in stderr if 'Traceback' in t or 'Error' in t], stderr
    outputs = '\n'.join(page.locator('.jp-OutputArea').all_inner_texts())
    assert 'Traceback' not in outputs, outputs[-2000:]

def image_difference(a:bytes, b:bytes)->float:
    "Share of pixels that differ between two PNG screenshots of the same size."
    import io
    import numpy as np
    from PIL import Image
    x, y = (np.asarray(Image.open(io.BytesIO(v)).convert('RGB'), dtype=np.int16) for v in (a, b))
    if x.shape != y.shape: return 1.0
    return float((np.abs(x - y).sum(-1) > 30).mean())

def run_all_cells(page):
    "Run > Run All Cells once the kernel is connected and idle (accepting the kernel dialog should one still appear)."
    page.wait_for_function("() => [...document.querySelectorAll('.jp-StatusBar-TextItem')].some(e => /Python.*\\| Idle/.test(e.innerText))", timeout=90_000)
    page.locator('.lm-MenuBar-itemLabel', has_text=re.compile('^Run$')).click()
    page.locator('.lm-Menu-itemLabel', has_text=re.compile('^Run All Cells$')).click()
    try: page.locator('.jp-Dialog .jp-mod-accept').click(timeout=3_000)
    except Exception: pass                                            # no dialog: the usual case

def test_explore_nag_runs_and_the_w_nag_slider_redraws(browser, lab):
    t0 = time.time()
    page = browser.new_page(viewport={'width': 1400, 'height': 1100})
    page.set_default_timeout(60_000)
    SHOTS.mkdir(parents=True, exist_ok=True)
    try: check_explorer(page, lab)
    except Exception:
        page.screenshot(path=str(SHOTS / 'explore_nag_failure.png'), full_page=True); raise
    finally: page.close()
    print(f'\nbrowser test: JupyterLab + Chromium, run all, slider redraw in {time.time() - t0:.1f} s; screenshot {SHOTS / "explore_nag.png"}')

def check_explorer(page, lab:str):
    "Open, run all, wait for the widget, move w_nag by keyboard, compare the figure, look for errors, take a screenshot."
    page.goto(f'{lab}/lab/tree/explore_nag.ipynb')
    page.wait_for_selector('.jp-NotebookPanel .jp-Cell')
    run_all_cells(page)
    img = page.locator('.jp-OutputArea-output img.widget-image').first
    img.wait_for(state='visible', timeout=40_000)
    page.wait_for_function("() => document.querySelector('.jp-OutputArea-output .widget-html table') !== null", timeout=120_000)
    img.scroll_into_view_if_needed()
    before, src = img.screenshot(), img.get_attribute('src')
    slider = page.locator('.widget-hslider').filter(has=page.locator('label', has_text=re.compile('^w_nag$')))
    slider.locator('.noUi-handle').focus()
    for _ in range(5): page.keyboard.press('ArrowRight')                 # 5 steps of 0.05: w_nag = 0.25
    page.wait_for_function("() => [...document.querySelectorAll('.jp-OutputArea-output .widget-html')].some(e => e.innerText.includes('w_nag = 0.25'))", timeout=120_000)
    page.wait_for_function(f"() => document.querySelector('.jp-OutputArea-output img.widget-image').src !== {json.dumps(src)}", timeout=60_000)
    after = img.screenshot()
    assert slider.locator('.widget-readout').inner_text().strip() == '0.25'
    assert image_difference(before, after) > 0.002, 'the figure did not change'
    no_tracebacks(page)
    page.screenshot(path=str(SHOTS / 'explore_nag.png'), full_page=True)
