"""
Driving the viewer in headless Chromium (see L{tests.viewerbuild.startChromium}):
logging in through the form, and telling that an image is on a canvas from
its pixels, not from the DOM.
"""

from typing import List

#: Reads the pixels of every visible canvas: OHIF (cornerstone3D) copies each
#: rendered viewport into a 2D canvas, so a drawn image shows there as many
#: grey levels, a blank viewport as one.
CANVAS_PIXELS = """
const found = [];
for (const canvas of document.querySelectorAll('canvas')) {
  if (canvas.width < 64 || canvas.height < 64) continue;
  const context = canvas.getContext('2d', {willReadFrequently: true});
  if (!context) continue;
  const data = context.getImageData(0, 0, canvas.width, canvas.height).data;
  const levels = new Set();
  let lit = 0;
  for (let i = 0; i < data.length; i += 4 * 7) {
    levels.add(data[i] << 16 | data[i + 1] << 8 | data[i + 2]);
    if (data[i] + data[i + 1] + data[i + 2] > 30) lit++;
  }
  found.push({width: canvas.width, height: canvas.height, levels: levels.size,
              litFraction: lit / (data.length / (4 * 7))});
}
return found;
"""


def waitUntil(browser, condition, timeout: float = 60, message: str = ""):
    """
    What C{condition(browser)} returns once it is true, asked every 0.2 s;
    fails after C{timeout} seconds with C{message}.
    """
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(browser, timeout, poll_frequency=0.2).until(condition, message)


def logIn(browser, base: str, user, path: str = "/") -> None:
    """
    Open C{base + path}, be sent to the login page, and log in as C{user}
    (name, password) through the form.
    """
    from selenium.webdriver.common.by import By

    browser.get(base + path)
    waitUntil(browser, lambda b: "/login" in b.current_url, message="no redirect to the login page")
    browser.find_element(By.CSS_SELECTOR, "input[name=user]").send_keys(user[0])
    browser.find_element(By.CSS_SELECTOR, "input[name=password]").send_keys(user[1])
    browser.find_element(By.CSS_SELECTOR, "form [type=submit]").click()
    waitUntil(browser, lambda b: "/login" not in b.current_url, message="the login did not go through")


def viewStudy(browser, base: str, studyUID: str, timeout: float = 120) -> List[dict]:
    """
    Open the study C{studyUID} in the viewer and wait until a canvas shows
    an image; the canvases that do.
    """
    browser.get(f"{base}/viewer?StudyInstanceUIDs={studyUID}")

    def drawn(b):
        canvases = b.execute_script(CANVAS_PIXELS)
        return [c for c in canvases if c["levels"] > 20 and c["litFraction"] > 0.2] or False

    return waitUntil(browser, drawn, timeout=timeout, message="no canvas shows the image")
