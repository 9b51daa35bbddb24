// Images on the page: the API answers 28x28 integer rows (format "array") or base64 PNG; both are shown here.

const SIZE = 28;

// Draw 28 rows of gray levels onto a 28x28 canvas.
export function drawGray(canvas, rows) {
  const context = canvas.getContext("2d");
  const image = context.createImageData(SIZE, SIZE);
  rows.flat().forEach((v, i) => image.data.set([v, v, v, 255], 4 * i));
  context.putImageData(image, 0, 0);
}

// Draw a 28x28 map of log p(x_i | x_<i) in nats as bits, on a black-red-yellow-white scale up to MAX_BITS.
const MAX_BITS = 8;
export function drawHeat(canvas, logprobs) {
  const context = canvas.getContext("2d");
  const image = context.createImageData(SIZE, SIZE);
  logprobs.flat().forEach((lp, i) => {
    const t = Math.min(1, -lp / Math.LN2 / MAX_BITS);
    const rgb = [Math.min(1, 3 * t), Math.min(1, Math.max(0, 3 * t - 1)), Math.max(0, 3 * t - 2)];
    image.data.set([...rgb.map((c) => Math.round(255 * c)), 255], 4 * i);
  });
  context.putImageData(image, 0, 0);
}

// Replace the children of `container` with the images, each a canvas (rows) or an img (base64 PNG).
export function showImages(container, images, describe = (i) => `image ${i + 1}`) {
  container.replaceChildren(...images.map((image, i) => {
    if (typeof image === "string") {
      const img = document.createElement("img");
      img.src = `data:image/png;base64,${image}`;
      img.alt = describe(i);
      return img;
    }
    const canvas = document.createElement("canvas");
    canvas.width = canvas.height = SIZE;
    canvas.setAttribute("role", "img");
    canvas.setAttribute("aria-label", describe(i));
    drawGray(canvas, image);
    return canvas;
  }));
}
