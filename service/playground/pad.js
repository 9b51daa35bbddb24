// The 28x28 drawing pad: pointer events (mouse, touch and pen alike), and the keyboard for those without one.
// Strokes are painted like MNIST's anti-aliased pen: full white at the centre, fading out over a pixel or so.

const SIZE = 28;
const CORE = 0.55; // pixels from the stroke's centre that are painted fully
const EDGE = 1.6; // pixels from the centre where the paint fades to nothing

export class Pad {
  // onChange() while a stroke is drawn (as often as the pointer moves), onStroke() when one ends
  constructor(canvas, { onChange, onStroke }) {
    this.canvas = canvas;
    this.context = canvas.getContext("2d");
    this.pixels = new Uint8ClampedArray(SIZE * SIZE);
    this.onChange = onChange;
    this.onStroke = onStroke;
    this.cursor = null; // [x, y] of the keyboard cursor while the pad has focus
    this.last = null; // the pointer's previous position during a stroke
    canvas.addEventListener("pointerdown", (e) => this.#down(e));
    canvas.addEventListener("pointermove", (e) => this.#move(e));
    canvas.addEventListener("pointerup", (e) => this.#up(e));
    canvas.addEventListener("pointercancel", (e) => this.#up(e));
    canvas.addEventListener("keydown", (e) => this.#key(e));
    canvas.addEventListener("focus", () => { this.cursor ??= [SIZE / 2, SIZE / 2]; this.render(); });
    canvas.addEventListener("blur", () => this.render());
    this.render();
  }

  // The image as the API takes it: 28 rows of 28 integers 0..255.
  rows() {
    return Array.from({ length: SIZE }, (_, r) => Array.from(this.pixels.subarray(r * SIZE, (r + 1) * SIZE)));
  }

  set(rows) {
    rows.flat().forEach((v, i) => { this.pixels[i] = v; });
    this.render();
  }

  clear() {
    this.pixels.fill(0);
    this.render();
  }

  render() {
    const image = this.context.createImageData(SIZE, SIZE);
    this.pixels.forEach((v, i) => image.data.set([v, v, v, 255], 4 * i));
    if (this.cursor && document.activeElement === this.canvas) {
      const i = 4 * (this.cursor[1] * SIZE + this.cursor[0]);
      image.data.set([255, 140, 0, 255], i);
    }
    this.context.putImageData(image, 0, 0);
  }

  #point(e) {
    const box = this.canvas.getBoundingClientRect();
    return [((e.clientX - box.left) / box.width) * SIZE, ((e.clientY - box.top) / box.height) * SIZE];
  }

  #down(e) {
    if (e.button !== 0) return;
    this.canvas.setPointerCapture(e.pointerId);
    this.last = this.#point(e);
    this.#paint(this.last, this.last);
  }

  #move(e) {
    if (this.last === null) return;
    const here = this.#point(e);
    this.#paint(this.last, here);
    this.last = here;
  }

  #up() {
    if (this.last === null) return;
    this.last = null;
    this.onStroke();
  }

  #key(e) {
    const moves = { ArrowLeft: [-1, 0], ArrowRight: [1, 0], ArrowUp: [0, -1], ArrowDown: [0, 1] };
    this.cursor ??= [SIZE / 2, SIZE / 2];
    const centre = ([x, y]) => [x + 0.5, y + 0.5];
    if (moves[e.key]) {
      const from = this.cursor;
      const [dx, dy] = moves[e.key];
      this.cursor = [Math.min(SIZE - 1, Math.max(0, from[0] + dx)), Math.min(SIZE - 1, Math.max(0, from[1] + dy))];
      if (e.shiftKey) this.#paint(centre(from), centre(this.cursor));
      this.render();
      if (e.shiftKey) this.onStroke();
    } else if (e.key === " " || e.key === "Enter") {
      this.#paint(centre(this.cursor), centre(this.cursor));
      this.onStroke();
    } else {
      return;
    }
    e.preventDefault();
  }

  // Paint the segment a-b (pad coordinates, pixels): each pixel takes the larger of its value and the pen's.
  #paint(a, b) {
    const [ax, ay] = a;
    const [bx, by] = b;
    const length2 = (bx - ax) ** 2 + (by - ay) ** 2;
    for (let y = 0; y < SIZE; y++) {
      for (let x = 0; x < SIZE; x++) {
        const px = x + 0.5;
        const py = y + 0.5;
        const t = length2 ? Math.max(0, Math.min(1, ((px - ax) * (bx - ax) + (py - ay) * (by - ay)) / length2)) : 0;
        const d = Math.hypot(px - (ax + t * (bx - ax)), py - (ay + t * (by - ay)));
        const ink = Math.round(255 * Math.max(0, Math.min(1, (EDGE - d) / (EDGE - CORE))));
        const i = y * SIZE + x;
        if (ink > this.pixels[i]) this.pixels[i] = ink;
      }
    }
    this.render();
    this.onChange();
  }
}
