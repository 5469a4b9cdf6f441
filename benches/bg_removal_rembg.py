"""rembg's side of benches/bg_removal.rs: rembg's own Python API on the same
model file, images and thread count, driven over stdin/stdout so that both
sides run in one process tree and take turns.

Started as `python bg_removal_rembg.py THREADS` with U2NET_HOME set to the
directory holding u2netp.onnx. Prints one JSON line when ready (the session's
creation and the first, cold image), then answers one JSON line per request:

  {"steps": "a.jpg"}                 -> {"decode": s, "preprocess": s, ...}
  {"batch": ["a.jpg", ...], "concurrency": 3}  -> {"seconds": s}

`steps` splits one image the way rembg's `remove()` runs it (decode and EXIF
orientation, U2netpSession.predict's normalisation, inference and mask
resize, naive_cutout, PNG save), with rembg's own functions where it has
them. `batch` calls `rembg.remove(bytes, session=...)` itself from
`concurrency` threads sharing the one session, as a Python service would.
"""

import io
import json
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import onnxruntime as ort
from PIL import Image
from rembg import new_session, remove
from rembg.bg import fix_image_orientation, naive_cutout


def steps(session, path):
    data = open(path, "rb").read()
    t = [time.perf_counter()]
    img = fix_image_orientation(Image.open(io.BytesIO(data)))
    img.load()
    t.append(time.perf_counter())
    feed = session.normalize(img, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225), (320, 320))
    t.append(time.perf_counter())
    outs = session.inner_session.run(None, feed)
    t.append(time.perf_counter())
    # U2netpSession.predict after its run, line for line.
    pred = outs[0][:, 0, :, :]
    ma, mi = np.max(pred), np.min(pred)
    pred = np.squeeze((pred - mi) / (ma - mi))
    mask = Image.fromarray((pred * 255).astype("uint8"), mode="L")
    mask = mask.resize(img.size, Image.Resampling.LANCZOS)
    cutout = naive_cutout(img, mask)
    t.append(time.perf_counter())
    bio = io.BytesIO()
    cutout.save(bio, "PNG")
    t.append(time.perf_counter())
    names = ["decode", "preprocess", "inference", "postprocess", "encode"]
    return {n: t[i + 1] - t[i] for i, n in enumerate(names)}


def batch(session, paths, concurrency):
    datas = [open(p, "rb").read() for p in paths]
    started = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        for out in pool.map(lambda d: remove(d, session=session), datas):
            assert out[:8] == b"\x89PNG\r\n\x1a\n"
    return {"seconds": time.perf_counter() - started}


def main():
    threads = int(sys.argv[1])
    first = sys.argv[2]
    opts = ort.SessionOptions()
    # What rembg does with OMP_NUM_THREADS set: both pools to that size.
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = threads
    t = time.perf_counter()
    session = new_session("u2netp", sess_opts=opts)
    created = time.perf_counter() - t
    t = time.perf_counter()
    remove(open(first, "rb").read(), session=session)
    cold = time.perf_counter() - t
    print(json.dumps({"session": created, "first_image": cold, "onnxruntime": ort.__version__}), flush=True)
    for line in sys.stdin:
        req = json.loads(line)
        if "steps" in req:
            out = steps(session, req["steps"])
        else:
            out = batch(session, req["batch"], req["concurrency"])
        print(json.dumps(out), flush=True)


if __name__ == "__main__":
    main()
