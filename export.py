"""Export a trained TaskExpert for apps: ONNX and Core ML files, each checked against PyTorch.

    python export.py --target onnx      # the newest checkpoint under runs/, at its training size
    python export.py --target all --weights fp32 int8 --checkpoint runs/nyud/best.pt --img-size 480 640

The app contract, the same for both targets at one fixed input size H x W (in full: docs/export.md):
- input 'image': RGB values 0-255; ONNX float32 (B, 3, H, W), Core ML an H x W image. A smaller image
  sits at the top left, padded with the ImageNet mean colour. The model normalises it: its first op.
- outputs: one per task at H x W, by the task's kind. classes: int32 (B, H, W) class ids (with
  --probabilities also '<task>_prob' float32 (B, C, H, W)); binary: float32 (B, 1, H, W) probabilities;
  depth: float32 (B, 1, H, W) metres; normals: float32 (B, 3, H, W) unit vectors.
- weights (--weights): ONNX fp32 (default) or int8; Core ML fp32, fp16 (default), int8 or 4bit.
Each file is written in a work folder, checked against PyTorch and measured on val images, then moved
into place. Part I: the app model, the ONNX and Core ML conversions, the main path."""
import argparse, contextlib, copy, errno, functools, glob, hashlib, json, logging, os, platform, re, resource
import shutil, signal, socket, statistics, sys, tempfile, time, traceback

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from data import CLASS_NAMES, READERS, DataError, collate, make_meters, render_scene, update_meters, write_synthetic
from taskexpert import (IMAGENET_MEAN, IMAGENET_STD, PATCH, TASK_SET, TASK_TABLE, TASKS, TaskExpert, denormalise,
                        normalise, postprocess, set_grid, unknown_kind)


# ---- The app model: what an app feeds in and gets back (the contract above) --------------------------------
class AppModel(nn.Module):
    """RGB 0-255 (B, 3, H, W) -> the post-processed outputs, a tuple in the order of output_names.
    Its first op is the normalisation (taskexpert.normalise, as in training), and its only place."""

    def __init__(self, model, probabilities=False):
        super().__init__()
        self.model, self.probabilities = model, probabilities
        self.output_names = output_names(model.tasks, probabilities)
        self.eval()

    def forward(self, image):
        return tuple(postprocess(self.model(normalise(image)), self.probabilities).values())


def at_size(model, img_size):
    """A copy of the model for one input size (H, W), its position embedding resampled here, not in the graph."""
    model = copy.deepcopy(model).eval()
    set_grid(model.backbone, (img_size[0] // PATCH, img_size[1] // PATCH))
    return model


def output_names(tasks, probabilities):
    """One output per task, named after it; with probabilities, '<task>_prob' after each class map."""
    return [n for t in tasks for n in ((t, t + '_prob') if probabilities and is_class_map(t) else (t,))]


# ---- ONNX: the dynamo exporter, one file -------------------------------------------------------------------
def export_onnx(app, img_size, path, weights, meta, descriptions, fp32=None, calibration=None):
    """The dynamo exporter at opset 20 (pinned: torch 2.13's default, the version tested), batch dynamic,
    all weights in one file. int8: an fp32 file (fp32, else one made here) quantized (write_onnx_int8)."""
    import onnx
    made = weights == 'fp32' or fp32 is None
    if made:
        example = torch.from_numpy(check_images(2, img_size))  # batch 2: a batch-1 example fixes the batch to 1
        program = torch.onnx.export(app, (example,), dynamo=True, opset_version=20, input_names=['image'],
                                    output_names=app.output_names, dynamic_shapes=({0: torch.export.Dim('batch')},),
                                    external_data=False)
        label_onnx(program.model, meta, descriptions)
        fp32 = path if weights == 'fp32' else path + '.fp32'
        program.save(fp32, external_data=False)
    if weights == 'int8':
        write_onnx_int8(fp32, path, calibration)
        if made:
            os.remove(fp32)
    onnx.checker.check_model(path, full_check=True)


# ---- Core ML: torch.export, then coremltools' converter to an ML program -----------------------------------
def export_coreml(app, img_size, path, weights, meta, descriptions):
    """torch.export -> Core ML ML program: fp32, or fp16 arithmetic with fp16, int8 or 4-bit weights
    (WEIGHTS). iOS 17+; iOS 18+ for 4bit (its block-wise int4 weights)."""
    ct = import_coremltools()
    mlmodel = ct.convert(
        exported_program(app, tuple(img_size)), convert_to='mlprogram',
        minimum_deployment_target=ct.target.iOS18 if weights == '4bit' else ct.target.iOS17,
        compute_precision=ct.precision.FLOAT32 if weights == 'fp32' else ct.precision.FLOAT16,
        # the frame as it is, 0-255 (scale 1, no bias): AppModel's first op normalises it
        inputs=[ct.ImageType(name='image', shape=(1, 3, *img_size), color_layout=ct.colorlayout.RGB, scale=1.0,
                             bias=[0.0, 0.0, 0.0])],
        # float32 outputs (else an fp16 program returns Float16), int32 class maps
        outputs=[ct.TensorType(name=n, dtype=np.int32 if is_class_map(n) else np.float32)
                 for n in app.output_names])
    if weights in ('int8', '4bit'):
        mlmodel = quantize_coreml(mlmodel, weights)
    label_coreml(mlmodel, weights, meta, descriptions)
    mlmodel.save(path)


# ---- The main path: flags -> model -> each file exported, checked and moved into place ---------------------
def main():
    """Export the files the flags ask for. The checkpoint, the val frames and the out-dir are checked
    first, in this order (a one-line error, nothing written). Then each file; then the benchmark."""
    args, variants = parse_args()
    done = {}  # (target, weights) -> the file, as each is moved into place
    with stopping(variants, done):  # Ctrl-C, SIGTERM, a refused write: one line saying what was written
        path, model, img_size = load_model(args)
        app = AppModel(model, args.probabilities)
        meta, descriptions = describe(model.config, model.tasks, args.probabilities, img_size, path, model.step)
        root, samples, calibration = val_frames(args, model.config, img_size, model.tasks, ('onnx', 'int8') in variants)
        stem = os.path.join(open_out_dir(args, path), file_stem(model.config, model.tasks, img_size))
        print(f'export.py: {path} ({model.config["dataset"]}, ViT-{model.config["backbone"]}), '
              f'input {img_size[0]}x{img_size[1]}, outputs {", ".join(app.output_names)}')
        measure = metric_measure(model, args.probabilities, root, samples)
        for target, weights in variants:
            if target == 'onnx':  # int8: from this run's fp32 file if any, calibrated on val frames
                export = functools.partial(export_onnx, fp32=done.get(('onnx', 'fp32')),
                                           calibration=calibration if weights == 'int8' else None)
                check, load, ext = check_onnx, load_onnx, '.onnx'
            else:
                export, check, load, ext = export_coreml, check_coreml, load_coreml, '.mlpackage'
            file = stem + ('' if (target, weights) == ('onnx', 'fp32') else f'_{weights}') + ext
            if run_target(f'{target} {weights}', file,
                          lambda tmp: export(app, img_size, tmp, weights, meta, descriptions),
                          lambda tmp: check(tmp, model, args.probabilities, img_size, weights),
                          lambda tmp: measure(load, tmp)):
                done[target, weights] = file
            stop_if_asked()  # a signal held while a file was moved into place or a work folder removed
        if args.benchmark and any(t == 'onnx' for t, _ in done):
            benchmark(app, done, img_size)
    if failed := [f'{t} {w}' for t, w in variants if (t, w) not in done]:
        raise SystemExit(f'export.py: failed: {", ".join(failed)}')


def run_target(name, path, export, check, measure):
    """Export in a work folder, check it, measure it (-> a line, or None), move it into place, print the
    report -> True. False if its export or check failed (said why). The work folder goes either way."""
    work, t0 = work_dir(path), time.perf_counter()
    try:
        remove(work)  # this process's name: a leftover of an earlier process with the same pid
        os.makedirs(work)
        tmp = os.path.join(work, os.path.basename(path))
        export(tmp)
        t_export = time.perf_counter() - t0
        how, lines = check(tmp)
        t_check = time.perf_counter() - t0 - t_export
        measured = measure(tmp)  # on val frames: the Core ML checker's fp16 sums are checked there too
        with uninterrupted():
            install(tmp, path)
    except Exception as e:
        return failure(name, path, e)
    finally:
        with uninterrupted():
            remove(work)
    print(f'{name}: {path}\n  size {disk_size(path) / 2 ** 20:.1f} MiB, export {t_export:.1f} s, '
          f'check {t_check:.1f} s\n  check passed ({how}):\n    ' + '\n    '.join(lines) + f'\n  {measured}' * bool(measured))
    return True


# Part II: the machinery: metadata, checks against PyTorch, quantization, the Core ML interpreter, safe writes, flags
# -------------------------------------------------------------------------------------------------
# What the files say (metadata, descriptions, names), and helpers of the conversions
# -------------------------------------------------------------------------------------------------

# The input contract's letterbox, as training pads (data.to_tensors) and predict fits an image. The pad
# colour is the ImageNet mean in 0-255 RGB, 0 after normalisation.
PAD_RGB = tuple(round(255 * m, 3) for m in IMAGENET_MEAN)  # (123.675, 116.28, 103.53); 8-bit: 124, 116, 104
LETTERBOX = ('an image larger than the input is shrunk to fit, aspect kept (bilinear; never enlarged), placed at '
             'the top left, the rest padded with metadata padding; the outputs of its top-left region are the '
             "image's")


def is_class_map(name):
    """Whether an output (a task, or '<task>_prob') is a class map."""
    return name in TASK_TABLE and TASK_TABLE[name].kind == 'classes'


def sha256(path):
    digest = hashlib.sha256()
    with open(path, 'rb') as f:
        for block in iter(lambda: f.read(1 << 20), b''):
            digest.update(block)
    return digest.hexdigest()


def describe(config, tasks, probabilities, img_size, checkpoint, step):
    """-> (metadata dict str -> str, dict output name -> description), the same for both targets.
    Each description says the task's output (TASK_TABLE's what) and its kind's type and shape. The
    checkpoint is named by its file name and SHA-256: no path of this machine goes into an app."""
    dataset = config['dataset']
    names = CLASS_NAMES[TASK_SET[dataset]]
    H, W = img_size
    meta = {
        'tasks': ','.join(tasks),
        'classes': json.dumps({t: list(names[t]) for t in tasks if is_class_map(t)}),
        'input_size': f'{H}x{W}',
        'input': f'RGB image {H}x{W}, values 0-255: {LETTERBOX}',
        'padding': json.dumps(PAD_RGB),
        'normalisation': f'inside the model, its first op (as in training): (x / 255 - mean) / std per channel, '
                         f'ImageNet mean {IMAGENET_MEAN}, std {IMAGENET_STD}',
        'dataset': dataset,
        'backbone': config['backbone'],
        'checkpoint': os.path.basename(checkpoint),
        'checkpoint_sha256': sha256(checkpoint),
        'step': str(step),
    }
    out = {}
    for task, channels in tasks.items():
        what, kind = TASK_TABLE[task].what, TASK_TABLE[task].kind
        if kind == 'classes':
            out[task] = (f'{what} (B, {H}, {W}) int32: argmax over {channels} classes, ' +
                         ', '.join(f'{i} {n}' for i, n in enumerate(names[task])))
            if probabilities:
                out[task + '_prob'] = (f'{task} class probabilities (B, {channels}, {H}, {W}) float32, softmax over '
                                       'the classes')
        else:
            out[task] = f'{what} (B, {channels}, {H}, {W}) float32' + ' in [0, 1]' * (kind == 'binary')
    return meta, out


def label_onnx(model, meta, descriptions):
    """The metadata and descriptions (Netron shows them) written into an fp32 ONNX model (onnx_ir)."""
    model.metadata_props.update(meta, weights=WEIGHTS['onnx']['fp32'])
    model.graph.inputs[0].doc_string = meta['input'] + ', float32 (B, 3, H, W)'
    for value in model.graph.outputs:
        value.doc_string = descriptions[value.name]


def label_coreml(mlmodel, weights, meta, descriptions):
    """The metadata and descriptions (Xcode shows them) written into a Core ML model."""
    mlmodel.author = 'TaskExpert open implementation (export.py)'
    mlmodel.short_description = (f'TaskExpert (Ye & Xu, ICCV 2023) multi-task dense prediction, ViT-{meta["backbone"]} '
                                 f'trained on {meta["dataset"]}: {meta["tasks"].replace(",", ", ")} from one RGB image')
    mlmodel.version = f'step {meta["step"]}'
    mlmodel.user_defined_metadata.update(meta, weights=WEIGHTS['coreml'][weights])
    mlmodel.input_description['image'] = meta['input']
    for name, text in descriptions.items():
        mlmodel.output_description[name] = text.replace('(B, ', '(1, ')


def file_stem(config, tasks, img_size):
    """The name of a model's files, without weights and extension: taskexpert_<dataset>_<backbone>_<H>x<W>.
    Then its tasks, when they are not all of the dataset's (in the dataset's order, joined by '-'), and
    its ablation, if any. So a depth-only or an ablated model never replaces the full model's file."""
    every = TASKS[TASK_SET[config['dataset']]]
    parts = ['taskexpert', config['dataset'], config['backbone'], f'{img_size[0]}x{img_size[1]}']
    if len(tasks) < len(every):
        parts.append('-'.join(t for t in every if t in tasks))
    if config['ablation'] != 'none':
        parts.append(config['ablation'])
    return '_'.join(parts)


@contextlib.contextmanager
def quiet(*loggers):
    """Log messages of these loggers ('' = the root logger) below ERROR are dropped for the duration."""
    loggers = [logging.getLogger(name) for name in loggers]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)


def import_coremltools():
    """coremltools, without the warnings it logs on import on Linux (no Core ML framework to load, a
    torch newer than it was tested with). Its conversion warnings still show."""
    with quiet('coremltools'):
        import coremltools
    return coremltools


@functools.lru_cache(maxsize=1)
def exported_program(app, img_size):
    """The app model as coremltools converts it: torch.export at batch 1, decomposed to core ATen ops.
    Made once per model and size: each Core ML weights choice converts the same program."""
    H, W = img_size
    return torch.export.export(app, (torch.zeros(1, 3, H, W),)).run_decompositions({})


# -------------------------------------------------------------------------------------------------
# Comparing an exported model's outputs with PyTorch's
# -------------------------------------------------------------------------------------------------

def reference(model, images, probabilities):
    """What the exported model must output: the PyTorch model (at the export size) on the frames,
    normalised by taskexpert.normalise as AppModel does. images: float32 (B, 3, H, W) in 0-255 ->
    (dict output name -> array, dict task -> raw head output (B, C_t, H, W))."""
    with torch.no_grad():
        raw = model.eval()(normalise(torch.from_numpy(images)))
    return {k: v.numpy() for k, v in postprocess(raw, probabilities).items()}, {k: v.numpy() for k, v in raw.items()}


def check_images(n, img_size, seed=0, noise=True):
    """n test frames, float32 (n, 3, H, W), integers 0-255 like a camera's. Even ones are synthetic
    rooms (data.render_scene: smooth surfaces, edges). Odd ones are uniform noise: every input value,
    far from the training statistics. All are rooms if not noise."""
    rng = np.random.default_rng(seed)
    frames = [render_scene(rng, img_size)['image'].transpose(2, 0, 1) if i % 2 == 0 or not noise else
              rng.integers(0, 256, (3, *img_size)) for i in range(n)]
    return np.stack(frames).astype(np.float32)


# Check tolerances per kind of output and weights of the exported model. An output value passes
# if |exported - PyTorch| <= tol * max(1, |PyTorch|): absolute for probabilities and unit normals
# (at most 1), relative for depths above 1 m. fp32 and fp16 sit about 10x above the rounding errors
# of a correct conversion, and far below the errors of a conversion bug (a wrong weight, layout or
# resize mode changes outputs by a good part of their range). Quantized weights err by themselves:
# the int8 and 4bit tolerances sit about 3x above their largest errors on the test model and on the
# quick start's checkpoint (docs/results.md, 'Exported files'). So one layer's scale off by 1.5x fails
# the int8 ones (2x for an ONNX int8 head), off by 2x the 4bit ones (tested). ONNX int8 also rounds
# the inputs of its layers to 8 bits with one scale per tensor (a MatMul's set at run time by its
# range, a conv's fixed by calibration). It errs more than weights alone: most at the heads' convs, on
# frames unlike the calibration's (the noise frame) and at large input sizes (docs/results.md, 'Exported files').
TOLERANCE = {
    'fp32': {'prob': 1e-5, 'depth': 2e-5, 'normals': 2e-4, 'logit': 1e-4},
    'fp16': {'prob': 1e-2, 'depth': 1e-2, 'normals': 5e-2, 'logit': 5e-2},
    'int8': {'prob': 5e-2, 'depth': 6e-2, 'normals': 0.1, 'logit': 0.15},
    'int8 onnx': {'prob': 0.1, 'depth': 0.1, 'normals': 0.1, 'logit': 0.25},
    '4bit': {'prob': 0.25, 'depth': 0.5, 'normals': 0.5, 'logit': 1.0},
}


class CheckFailed(Exception):
    pass


def output_kind(name):
    """The kind of an output: its task's (TASK_TABLE), or 'probabilities' for a '<task>_prob'."""
    return TASK_TABLE[name].kind if name in TASK_TABLE else 'probabilities'


def compare(got, ref, raw, tol):
    """got, ref: dict output name -> array; raw: the PyTorch head outputs (see reference). Returns one
    line per output. Raises CheckFailed (with those lines) if an output is out of tolerance.

    Each output is judged by its kind. Two kinds are ill-conditioned where the raw prediction is, so
    they are judged against it:
    - class maps, by the pixels that differ (compare_classes);
    - unit normals: a rounding error e of the raw 3-vector turns its direction by about e / |raw|. So a
      pixel's error is scaled by min(1, |raw| / median |raw|) before the test: raw vectors shorter than
      typical (e.g. where bilinear upsampling blends opposite normals) may err more."""
    lines, ok = [], True
    for name, r in ref.items():
        g, kind = got[name], output_kind(name)
        if g.shape != r.shape:
            passed, line = False, f'{name}: shape {g.shape}, PyTorch {r.shape}'
        elif kind == 'classes':
            passed, line = compare_classes(name, g, r, raw[name], tol['logit'])
        elif kind == 'normals':
            err = np.abs(g.astype(np.float64) - r).max(1)  # (B, H, W)
            length = np.linalg.norm(raw[name], axis=1)
            scaled = float((err * np.minimum(1, length / np.median(length))).max())
            passed = scaled <= tol['normals']
            line = (f'{name}: max |error| {err.max():.2e}, {scaled:.2e} scaled by the raw length '
                    f'(limit {tol["normals"]:g})')
        elif kind in ('binary', 'probabilities', 'depth'):  # probabilities; metres, relative above 1 m
            limit = tol['depth' if kind == 'depth' else 'prob']
            err = np.abs(g.astype(np.float64) - r)
            passed = bool((err <= limit * np.maximum(1, np.abs(r))).all())
            line = f'{name}: max |error| {err.max():.2e} (limit {limit:g}{" x max(1, |depth|)" * (kind == "depth")})'
        else:
            raise unknown_kind(name, 'tolerance of its exported output')
        lines.append(line + ('' if passed else '  <- OUT OF TOLERANCE'))
        ok &= passed
    if not ok:
        raise CheckFailed('outputs differ from PyTorch:\n    ' + '\n    '.join(lines))
    return lines


def compare_classes(name, got, ref, logits, tol):
    """A class map got against PyTorch's ref, with PyTorch's logits (B, C, H, W) -> (passed, line). A
    pixel may differ only at a near-tie: where PyTorch's logits of the two classes are within
    tol * max(1, |logit|). There the exported model's own rounding can pick the other class; a flip
    anywhere else is an error."""
    if ((got < 0) | (got >= logits.shape[1])).any():
        return False, f'{name}: class ids outside 0..{logits.shape[1] - 1}'
    top = np.take_along_axis(logits, ref[:, None].astype(np.int64), 1)[:, 0]  # (B, H, W)
    gap = top - np.take_along_axis(logits, got[:, None].astype(np.int64), 1)[:, 0]  # 0 where equal
    diff = got != ref
    bad = int((diff & (gap > tol * np.maximum(1, np.abs(top)))).sum())
    return bad == 0, (f'{name}: {100 * diff.mean():.4f}% of pixels differ, {bad} not at a near-tie (largest '
                      f'logit gap of a flip {gap[diff].max() if diff.any() else 0:.1e}, limit {tol:g})')


def subnormals(a):
    """How many values of an array are subnormal in its own float dtype (not 0, below its smallest
    normal number: 2^-14 in fp16, 2^-126 in fp32); 0 for integers."""
    a = np.asarray(a)
    return int(((a != 0) & (np.abs(a) < np.finfo(a.dtype).tiny)).sum()) if np.issubdtype(a.dtype, np.floating) else 0


def refuse_subnormals(bad, what):
    """bad: dict op -> how many of its values are subnormal; what: a phrase for them ('3 <what>')."""
    if bad:
        raise CheckFailed(f'{sum(bad.values())} {what}, read as 0 by hardware without subnormals: ' +
                          ', '.join(f'{op}: {n}' for op, n in bad.items()))


def compare_flushed(got, ref, raw, tol):
    """compare() for the run with subnormals flushed to zero: the same limits, its failure saying so."""
    try:
        compare(got, ref, raw, tol)
    except CheckFailed as e:
        raise CheckFailed(f'with subnormals flushed to zero, {e}') from None


def load_onnx(path, threads=0, flush=False):
    """-> a function: frames float32 (N, 3, H, W) in 0-255 -> dict output name -> (N, ...) array. It
    runs onnxruntime on this CPU with `threads` threads (0: one per core). flush: the CPU reads and
    writes subnormals as zero (onnxruntime's denormals-are-zero and flush-to-zero modes)."""
    import onnxruntime as ort
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    if flush:
        options.add_session_config_entry('session.set_denormal_as_zero', '1')
    session = ort.InferenceSession(path, options, providers=['CPUExecutionProvider'])
    names = [o.name for o in session.get_outputs()]
    return lambda images: dict(zip(names, session.run(None, {'image': images})))


def onnx_subnormals(path):
    """The stored floats of an ONNX file that are subnormal in their dtype -> dict 'op name (initializer)'
    -> their number, each named by the node that reads it."""
    import onnx
    graph = onnx.load(path).graph
    counts = {i.name: n for i in graph.initializer if (n := subnormals(onnx.numpy_helper.to_array(i)))}
    return {f'{node.op_type} {node.name!r} ({name})': counts[name] for node in graph.node for name in node.input
            if name in counts}


def check_onnx(path, model, probabilities, img_size, weights):
    """onnxruntime (CPU) vs PyTorch on a batch of 3 (not the batch of 2 it was exported with), then once
    more with subnormals flushed to zero. No stored float (weights, quantization scales) may be
    subnormal. int8 is checked on rooms alone: its convs' input ranges are calibrated on real frames,
    and clip those of the noise frame, as they would clip any frame unlike the calibration's."""
    refuse_subnormals(onnx_subnormals(path), 'stored values are subnormal')
    images = check_images(3, img_size, seed=1, noise=weights != 'int8')
    ref, raw = reference(model, images, probabilities)
    tol = TOLERANCE['int8 onnx' if weights == 'int8' else weights]
    lines = compare(load_onnx(path)(images), ref, raw, tol)
    compare_flushed(load_onnx(path, flush=True)(images), ref, raw, tol)
    lines.append('with subnormals flushed to zero (none stored; onnxruntime\'s denormals-are-zero mode): '
                 'within the same limits')
    frames = '3 rooms' if weights == 'int8' else '3 frames (room, noise, room)'
    return f'onnxruntime CPU vs PyTorch, {weights} weights, {frames}', lines


def check_coreml(path, model, probabilities, img_size, weights):
    """The saved package vs PyTorch on 2 frames (room, noise): by Core ML on macOS, else by the
    interpreter below (which checks fp16 sums). Then its program once more with subnormals flushed to
    zero (the interpreter, everywhere). No quantization parameter may be subnormal."""
    main = load_mil_program(path)
    refuse_subnormals(subnormal_parameters(main), 'quantization parameters are fp16 subnormals')
    images = check_images(2, img_size, seed=1)
    ref, raw = reference(model, images, probabilities)
    tol, peak = TOLERANCE[weights], {}
    darwin = platform.system() == 'Darwin'
    run = load_coreml(path) if darwin else interpreter(main, peak=peak)
    lines = compare(run(images), ref, raw, tol)
    compare_flushed(interpreter(main, flush=True)(images), ref, raw, tol)
    n, total = stored_subnormals(main)
    lines.append(f'with subnormals flushed to zero ({n:,} of the {total:,} stored values, and those computed): '
                 'within the same limits')
    if peak:
        lines.append(f'largest sum inside an fp16 op: {peak["sum"]:.3g} ({peak["op"]}; fp16 holds {FP16_MAX:g})')
    how = 'Core ML (CPU)' if darwin else 'its ML program run by the Linux checker'
    return f'{how} vs PyTorch, {weights} weights, 2 frames (room, noise)', lines


# -------------------------------------------------------------------------------------------------
# Quantization: what --weights writes
# -------------------------------------------------------------------------------------------------

# --weights: how each format stores its weights, in the words written to the file's metadata 'weights'.
# Weights smaller than coremltools' threshold (2048 values: gates, norms, biases) stay fp16 in every
# compressed Core ML package. ONNX int8 compresses the heads' 3x3 convs and the MatMul weights (the Linear
# layers: 88% of the parameters of TaskExpert ViT-B on PASCAL, 93% of ViT-L on NYUD); the patch
# embedding, the heads' 1x1 prediction convs, norms, biases and the position embedding stay fp32.
WEIGHTS = {
    'onnx': {
        'fp32': 'fp32',
        'int8': "int8 weights, one scale per output channel (onnxruntime): the heads' 3x3 convs static QDQ, their "
                'uint8 inputs scaled by calibration on val frames (quantize_static); MatMuls dynamic, their inputs '
                'quantized to uint8 at run time (quantize_dynamic, MatMulInteger); other weights (the patch '
                "embedding, the heads' 1x1 prediction convs) fp32",
    },
    'coreml': {
        'fp32': 'fp32 weights and arithmetic',
        'fp16': 'fp16 weights and arithmetic',
        'int8': 'int8 weights, one scale per output channel (coremltools linear_quantize_weights, iOS 17 '
                'constexpr_affine_dequantize), weights under 2048 values fp16; fp16 arithmetic',
        '4bit': 'int4 weights in blocks of 32 input channels with one fp16 scale each (coremltools '
                'linear_quantize_weights, iOS 18 constexpr_blockwise_shift_scale), weights under 2048 values or '
                'whose second axis 32 does not divide (the patch embedding\'s 3 colours, the position embedding '
                'unless its tokens are a multiple of 32) fp16; fp16 arithmetic',
    },
}
DEFAULT_WEIGHTS = {'onnx': 'fp32', 'coreml': 'fp16'}
WEIGHTS_ORDER = ('fp32', 'fp16', 'int8', '4bit')
NO_WEIGHTS = {  # why a format has no such weights
    ('onnx', 'fp16'): "onnxruntime's CPU kernels compute in fp32; for a smaller file use int8",
    ('onnx', '4bit'): "standard ONNX has no 4-bit MatMul (onnxruntime's MatMulNBits is a contrib op); use int8, "
                      "or --target coreml for 4bit",
}


def quantize_onnx(src, dst, calibration=None):
    """int8 with standard ONNX ops, in two passes of onnxruntime's quantizer:
    1. static, the heads' 3x3 convs (at 1/4 resolution, about half the work at the paper's width).
       QDQ: int8 weights, one scale per output channel; uint8 inputs, one scale per tensor, fixed by
       the min / max seen on `calibration` (frames float32 (N, 3, H, W) in 0-255). Two convs stay
       fp32: the patch embedding (~1% of the work), where every later error starts (in a trial at
       448x576, quantizing it gave most of the int8 file's error); and the heads' 1x1 prediction
       convs (~0.1%): QDQ would round their outputs, the predictions themselves, to 8 bits within
       the calibration frames' range, clipping a frame beyond it (a farther wall's depth).
    2. dynamic, each MatMul with a constant weight (the Linear layers; the attention products have
       none). MatMulInteger on int8 weights, one scale per output channel; its input is quantized to
       uint8 at run time (DynamicQuantizeLinear). In a trial it ran faster than static MatMuls.
       calibration None: this pass alone (what --benchmark compares an int8 file with).
    Their logging is silenced. It recommends onnxruntime's pre-processing, which on our graph
    quantizes the same ops to the same outputs (and whose symbolic shape inference fails on the
    exporter's Expand nodes)."""
    import onnx
    from onnxruntime.quantization import (CalibrationDataReader, QuantFormat, QuantType, quantize_dynamic,
                                          quantize_static)

    class Frames(CalibrationDataReader):
        def __init__(self):
            self.frames = iter(calibration)

        def get_next(self):
            frame = next(self.frames, None)
            return None if frame is None else {'image': frame[None]}
    convs = dst + '.conv'
    with quiet(''):
        if calibration is not None:
            fp32 = [n.name for n in onnx.load(src).graph.node  # the patch embedding, the 1x1 prediction convs
                    if n.op_type == 'Conv' and n.input[1].endswith(('patch_embed.proj.weight', '.pred.weight'))]
            quantize_static(src, convs, Frames(), quant_format=QuantFormat.QDQ, op_types_to_quantize=['Conv'],
                            nodes_to_exclude=fp32, per_channel=True, activation_type=QuantType.QUInt8,
                            weight_type=QuantType.QInt8)
        quantize_dynamic(src if calibration is None else convs, dst, op_types_to_quantize=['MatMul', 'Gemm'],
                         per_channel=True, weight_type=QuantType.QInt8)
    remove(convs)


def write_onnx_int8(fp32, path, calibration):
    """The fp32 ONNX file quantized to int8 at path (quantize_onnx), its metadata 'weights' said so. The
    quantizer keeps the other metadata and the descriptions."""
    import onnx
    quantize_onnx(fp32, path, calibration)
    proto = onnx.load(path)
    next(p for p in proto.metadata_props if p.key == 'weights').value = WEIGHTS['onnx']['int8']
    onnx.save(proto, path)


def quantize_coreml(mlmodel, weights):
    """Symmetric linear quantization of the fp16 program's weights: int8 with one scale per output
    channel, or int4 with one scale per block of 32 input channels. (With one scale per output channel,
    int4 erred 2-4x more on the quick start's model; coremltools' 4-bit k-means palettization needs
    scikit-learn, not a dependency here.) coremltools logs a warning for each weight whose second axis
    a block does not divide: those stay fp16, as WEIGHTS says, so its warnings are silenced."""
    import coremltools.optimize.coreml as cto
    config = (dict(dtype='int8', granularity='per_channel') if weights == 'int8' else
              dict(dtype='int4', granularity='per_block', block_size=32))
    with quiet('coremltools', ''):  # it logs those on the root logger too
        return cto.linear_quantize_weights(mlmodel, cto.OptimizationConfig(
            cto.OpLinearQuantizerConfig(mode='linear_symmetric', **config)))


# -------------------------------------------------------------------------------------------------
# The Core ML interpreter: the Linux check of a package
# -------------------------------------------------------------------------------------------------


# The Linux check: Core ML cannot run here, but the saved package's ML program can be read back
# (coremltools' milproto loader, weights from the package's blob file) and executed op by op with
# torch. Each op computes in fp32 and its result is rounded to the dtype the program declares for
# it (fp16 throughout an fp16 package), which models fp16 storage with fp32 accumulation. Two things
# a device may do differently are checked on top:
# - fp16 arithmetic inside an op: for the ops that sum over many values (FP16_SUMS) the interpreter
#   measures the largest sum the op forms before its result (a LayerNorm's sum of squares, a dot
#   product's partial sums) and fails if it passes fp16's largest number, naming the op;
# - no subnormals: the Neural Engine and GPUs may flush fp16 numbers below 2^-14 to zero. No
#   quantization parameter may be subnormal (subnormal_parameters), and the check runs a second time
#   with every stored and computed subnormal flushed to zero (flush=True).
# This checks the conversion and the saved weights, not Apple's kernels or the Neural Engine.
def _ints(v):
    return [int(i) for i in np.asarray(v).reshape(-1)]


def _bilinear(x, out_h, out_w, align_corners, half_pixel_centers):
    """Bilinear resampling of the last two axes on the sampling grid of MIL's upsample_bilinear."""
    def axis(n_in, n_out):
        i = torch.arange(n_out, dtype=torch.float64)
        if align_corners:
            src = i * ((n_in - 1) / max(n_out - 1, 1))
        elif half_pixel_centers:
            src = (i + 0.5) * (n_in / n_out) - 0.5
        else:
            src = i * (n_in / n_out)
        src = src.clamp(0, n_in - 1)
        lo = src.floor().long()
        return lo, (lo + 1).clamp(max=n_in - 1), (src - lo).float()
    (h0, h1, fh), (w0, w1, fw) = axis(x.shape[-2], out_h), axis(x.shape[-1], out_w)
    x = x[..., h0, :] * (1 - fh)[:, None] + x[..., h1, :] * fh[:, None]
    return x[..., w0] * (1 - fw) + x[..., w1] * fw


def _layer_norm(a):
    x, axes = a['x'], sorted(i % a['x'].ndim for i in _ints(a['axes']))
    if axes != list(range(x.ndim - len(axes), x.ndim)):
        raise NotImplementedError(f'layer_norm over axes {axes} of a rank-{x.ndim} tensor (not the last ones)')
    return F.layer_norm(x, x.shape[axes[0]:], a.get('gamma'), a.get('beta'), a['epsilon'])


def _conv(a):
    x, w = a['x'], a['weight']
    pad = _ints(a.get('pad', [0, 0, 0, 0]))  # MIL order: top, bottom, left, right
    if a.get('pad_type', 'valid') == 'valid':
        pad = [0, 0, 0, 0]
    elif a['pad_type'] != 'custom':
        raise NotImplementedError(f'conv pad_type {a["pad_type"]!r}')
    x = F.pad(x, (pad[2], pad[3], pad[0], pad[1]))
    return F.conv2d(x, w, a.get('bias'), _ints(a.get('strides', [1, 1])), 0, _ints(a.get('dilations', [1, 1])),
                    int(a.get('groups', 1)))


def _slice(a):
    x = a['x']
    begin, end = _ints(a['begin']), _ints(a['end'])
    stride = _ints(a.get('stride', [1] * x.ndim))
    bmask, emask = (list(np.asarray(a.get(k, [False] * x.ndim)).reshape(-1)) for k in ('begin_mask', 'end_mask'))
    squeeze = list(np.asarray(a.get('squeeze_mask', [False] * x.ndim)).reshape(-1))
    return x[tuple(begin[d] if squeeze[d] else slice(None if bmask[d] else begin[d], None if emask[d] else end[d],
                                                     stride[d]) for d in range(x.ndim))]


def _reshape(a):
    shape = _ints(a['shape'])  # MIL: 0 copies the input's size at that axis, -1 is inferred
    return a['x'].reshape([a['x'].shape[i] if s == 0 else s for i, s in enumerate(shape)])


def _reduce(fn):
    def run(a):
        axes = _ints(a['axes']) if 'axes' in a else list(range(a['x'].ndim))
        return fn(a['x'], axes, bool(a.get('keep_dims', False)))
    return run


def _per_block(s, shape):
    """A scale (or offset) with one value per block of a weight of `shape` (same rank, each size
    dividing the weight's), repeated over its block -> (*shape)."""
    s = torch.as_tensor(s).float()
    for d, n in enumerate(shape):
        s = s.repeat_interleave(n // s.shape[d], d)
    return s


def _affine_dequantize(a):
    """iOS 16/17 constexpr_affine_dequantize: (q - zero_point) * scale, one zero point and scale per
    index of `axis` (or one for all)."""
    q = a['quantized_data'].float()
    shape = [-1 if d == int(a['axis']) % q.ndim else 1 for d in range(q.ndim)]
    return (q - torch.as_tensor(a['zero_point']).float().reshape(shape)) * torch.as_tensor(a['scale']).float().reshape(shape)


def _blockwise_shift_scale(a):
    """iOS 18 constexpr_blockwise_shift_scale: (data - offset) * scale, one offset and scale per block."""
    x = a['data'].float()
    if 'offset' in a:
        x = x - _per_block(a['offset'], x.shape)
    return x * _per_block(a['scale'], x.shape)


_GELU = {'EXACT': 'none', 'TANH_APPROXIMATION': 'tanh'}  # MIL gelu mode -> torch's approximate=
_DTYPES = {'fp16': torch.float16, 'fp32': torch.float32, 'int32': torch.int32, 'bool': torch.bool}

# The MIL ops our converted models contain (iOS 17 and 18 opsets), each on a dict of its named inputs
MIL_OPS = {
    'add': lambda a: a['x'] + a['y'],
    'sub': lambda a: a['x'] - a['y'],
    'mul': lambda a: a['x'] * a['y'],
    'real_div': lambda a: a['x'] / a['y'],
    'maximum': lambda a: torch.maximum(a['x'], torch.as_tensor(a['y'])),
    'clip': lambda a: a['x'].clamp(float(a['alpha']), float(a['beta'])),
    'sigmoid': lambda a: torch.sigmoid(a['x']),
    'gelu': lambda a: F.gelu(a['x'], approximate=_GELU[a.get('mode', 'EXACT')]),
    'softmax': lambda a: torch.softmax(a['x'], int(a.get('axis', -1))),
    'layer_norm': _layer_norm,
    'linear': lambda a: F.linear(a['x'], a['weight'], a.get('bias')),
    'matmul': lambda a: torch.matmul(a['x'].mT if a.get('transpose_x') else a['x'],
                                     a['y'].mT if a.get('transpose_y') else a['y']),
    'conv': _conv,
    'upsample_bilinear': lambda a: _bilinear(
        a['x'], int(a['x'].shape[-2] * float(a.get('scale_factor_height', 1))),
        int(a['x'].shape[-1] * float(a.get('scale_factor_width', 1))), bool(a.get('align_corners', True)),
        bool(a.get('half_pixel_centers', not a.get('align_corners', True)))),
    'reshape': _reshape,
    'transpose': lambda a: a['x'].permute(_ints(a['perm'])),
    'squeeze': lambda a: a['x'].squeeze(tuple(_ints(a['axes']))) if 'axes' in a else a['x'].squeeze(),
    'concat': lambda a: torch.cat(a['values'], int(a['axis'])),
    'split': lambda a: torch.split(a['x'], _ints(a['split_sizes']) if 'split_sizes' in a else
                                   a['x'].shape[int(a['axis'])] // int(a['num_splits']), int(a['axis'])),
    'slice_by_index': _slice,
    'tile': lambda a: a['x'].repeat(_ints(a['reps'])),
    'reduce_mean': _reduce(lambda x, axes, keep: x.mean(axes, keepdim=keep)),
    'reduce_l2_norm': _reduce(lambda x, axes, keep: (x * x).sum(axes, keepdim=keep).sqrt()),
    'reduce_argmax': lambda a: a['x'].argmax(int(a.get('axis', -1)), keepdim=bool(a.get('keep_dims', False))),
    'cast': lambda a: a['x'].to(_DTYPES[a['dtype']]),
    # iOS 18 (a 4bit package): attention as one op, softmax(q k^T / sqrt(d)) v
    'scaled_dot_product_attention': lambda a: F.scaled_dot_product_attention(
        a['query'], a['key'], a['value'], a.get('attn_mask')),
    # compressed weights, expanded where they are read (the result is rounded to the program's fp16)
    'constexpr_affine_dequantize': _affine_dequantize,
    'constexpr_blockwise_shift_scale': _blockwise_shift_scale,
}


def load_mil_program(package):
    """The main function of the ML program saved in a .mlpackage, with its weights, as a PyMIL Function."""
    ct = import_coremltools()
    from coremltools.converters.mil.frontend.milproto.load import load
    mlmodel = ct.models.MLModel(package, skip_model_load=True)
    spec = mlmodel.get_spec()
    return load(spec, spec.specificationVersion, mlmodel.weights_dir).functions['main']


def _stored(v, flush=False):
    """A value as the interpreter keeps it: fp16 is widened to fp32 (exactly) for the ops that read it.
    With flush, a tensor's subnormals (in its own dtype) are set to zero first. Scalars are op
    parameters, kept as they are: a kernel reads them as it likes. (A LayerNorm's epsilon of 1e-6 is an
    fp16 subnormal. Read as 0, a constant token, such as an untrained class token, would give 0 / 0.)"""
    if flush and v.is_floating_point() and v.ndim:
        v = torch.where(v.abs() < torch.finfo(v.dtype).tiny, 0, v)
    return v.float() if v.dtype == torch.float16 else v


def _operand(v):
    """Scalars (an axis, epsilon, a flag) as Python numbers, tensors as they are."""
    return v.item() if isinstance(v, torch.Tensor) and v.ndim == 0 else v


def _layer_norm_sums(a):
    x = a['x']  # the normalised axes are the last ones (_layer_norm)
    axes = list(range(x.ndim - len(_ints(a['axes'])), x.ndim))
    return max(x.sum(axes).abs().max(), ((x - x.mean(axes, keepdim=True)) ** 2).sum(axes).max())


def _dot_sums(a):
    """|x| times |w| through the op itself: no partial sum of a dot product, in any order, is larger."""
    if 'query' in a:  # scaled_dot_product_attention: q k^T / sqrt(d); the softmax weights sum to 1
        return (a['query'].abs() @ a['key'].abs().mT).max() / a['query'].shape[-1] ** 0.5
    keys = {'x', 'y', 'weight'} & a.keys()
    op = 'matmul' if 'y' in a else 'conv' if a['weight'].ndim == 4 else 'linear'
    return MIL_OPS[op]({**a, **{k: a[k].abs() for k in keys}, 'bias': None}).max()


# The ops that sum over many values -> the largest sum they form in fp32 before their result, which a
# device computing in fp16 would have to hold (an fp16 package only)
FP16_SUMS = {
    'layer_norm': _layer_norm_sums,  # the sum of the inputs (the mean) and of squared deviations (variance)
    'reduce_mean': lambda a: _reduce(lambda x, axes, keep: x.sum(axes).abs())(a).max(),
    'reduce_l2_norm': lambda a: _reduce(lambda x, axes, keep: (x * x).sum(axes))(a).max(),
    'softmax': lambda a: float(a['x'].shape[int(a.get('axis', -1))]),  # sum of exp(x - max) <= the count
    'linear': _dot_sums, 'matmul': _dot_sums, 'conv': _dot_sums, 'scaled_dot_product_attention': _dot_sums,
}
FP16_MAX = float(torch.finfo(torch.float16).max)  # 65504


def run_mil_program(main, image, flush=False, peak=None):
    """Execute an ML program's main function (load_mil_program) on image float32 (1, 3, H, W) in
    0-255 -> dict output name -> array, as described above; flush: subnormals read as 0. Raises
    CheckFailed naming the op when an fp16 op's sum passes fp16's range; peak (a dict), if given,
    keeps the largest such sum as peak['sum'], peak['op']."""
    from coremltools.converters.mil.mil import types
    env = {name: torch.from_numpy(image) for name in main.inputs}
    for op in main.operations:
        if op.op_type == 'const':  # a weight (read from the blob file) or a parameter such as a shape
            v = op.outputs[0].val
            env[op.outputs[0].name] = v if isinstance(v, str) else _stored(torch.as_tensor(np.asarray(v)), flush)
            continue
        if op.op_type not in MIL_OPS:
            raise NotImplementedError(f'the Core ML checker has no rule for MIL op {op.op_type!r}: add one to MIL_OPS')
        args = {k: [_operand(env[v.name]) for v in var] if isinstance(var, (list, tuple)) else _operand(env[var.name])
                for k, var in op.inputs.items()}  # a list for concat's values
        dtypes = [types.builtin_to_string(var.dtype) for var in op.outputs]
        if op.op_type in FP16_SUMS and dtypes[0] == 'fp16':
            total = float(FP16_SUMS[op.op_type](args))
            if total > FP16_MAX:
                raise CheckFailed(f'{op.op_type} {op.name!r} forms a sum of {total:.3g} inside the op, beyond fp16\'s '
                                  f'{FP16_MAX:g}: a device computing it in fp16 overflows')
            if peak is not None and total > peak.get('sum', 0):
                peak.update(sum=total, op=f'{op.op_type} {op.name!r}')
        result = MIL_OPS[op.op_type](args)
        for var, dtype, value in zip(op.outputs, dtypes, result if isinstance(result, (tuple, list)) else (result,)):
            env[var.name] = _stored(value.to(_DTYPES[dtype]), flush)
    return {v.name: env[v.name].numpy() for v in main.outputs}


# The quantization parameters of each compressed-weight op of the iOS 16-18 opsets
QUANTIZATION_INPUTS = {'constexpr_affine_dequantize': ('scale', 'zero_point'),
                       'constexpr_blockwise_shift_scale': ('scale', 'offset'),
                       'constexpr_lut_to_dense': ('lut',)}


def subnormal_parameters(main):
    """An ML program's subnormal quantization parameters -> dict 'op_type name' -> their number."""
    counts = {f'{op.op_type} {op.name!r}': sum(subnormals(op.inputs[k].val) for k in keys if k in op.inputs)
              for op in main.operations if (keys := QUANTIZATION_INPUTS.get(op.op_type))}
    return {op: n for op, n in counts.items() if n}


def stored_subnormals(main):
    """-> (subnormal values, all values) of the floats an ML program stores (its const ops)."""
    consts = [np.asarray(op.outputs[0].val) for op in main.operations
              if op.op_type == 'const' and not isinstance(op.outputs[0].val, str)]
    return sum(subnormals(c) for c in consts), sum(c.size for c in consts if np.issubdtype(c.dtype, np.floating))


def one_at_a_time(run):
    """run: one frame (1, 3, H, W) -> dict of (1, ...) arrays -> the same for frames (N, 3, H, W)."""
    def predict(images):
        outs = [run(im[None]) for im in images]
        return {k: np.concatenate([np.asarray(o[k]) for o in outs]) for k in outs[0]}
    return predict


def interpreter(main, flush=False, peak=None):
    """An ML program's main function as a predict function (see load_coreml), run by run_mil_program."""
    return one_at_a_time(lambda im: run_mil_program(main, im, flush, peak))


def load_coreml(package):
    """-> a function: frames float32 (N, 3, H, W) in 0-255 -> dict output name -> (N, ...) array. The
    frames run one at a time (the input is one image): by Core ML itself on macOS (CPU, Apple's
    kernels), else by the ML program interpreter above."""
    if platform.system() != 'Darwin':
        return interpreter(load_mil_program(package))
    from PIL import Image
    ct = import_coremltools()
    mlmodel = ct.models.MLModel(package, compute_units=ct.ComputeUnit.CPU_ONLY)
    return one_at_a_time(lambda im: mlmodel.predict({'image': Image.fromarray(im[0].transpose(1, 2, 0).astype(np.uint8),
                                                                             'RGB')}))


# -------------------------------------------------------------------------------------------------
# Writing files: in a work folder beside the final path, moved into place when checked
# -------------------------------------------------------------------------------------------------

WORK_SUFFIX = re.compile(r'\.tmp-(.+)-(\d+)$')  # '<final name>.tmp-<host>-<pid>'


def work_dir(path):
    """The folder an export of path writes in. It lies beside path, so the final move is a rename. It
    is not named like an export, so nobody takes it for one. It names its host and process, so a later
    run can tell whether a killed one left it."""
    return f'{path}.tmp-{socket.gethostname()}-{os.getpid()}'


def remove(path):
    if os.path.isdir(path):
        shutil.rmtree(path)
    elif os.path.exists(path):
        os.remove(path)


def alive(pid):
    try:
        os.kill(pid, 0)  # signal 0: only asks whether the process exists
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, run by another user
        pass
    return True


def remove_stale_work(folder):
    """Remove the work folders that exports killed on this host left in folder -> their names. Those
    of a process still running (another export now) and of other hosts stay. A package that install
    had moved aside when the kill came first goes back to its name, if that name is free."""
    stale = [name for name in sorted(os.listdir(folder)) if (m := WORK_SUFFIX.search(name))
             and m[1] == socket.gethostname() and not alive(int(m[2]))]
    for name in stale:
        previous, final = os.path.join(folder, name, 'previous'), os.path.join(folder, WORK_SUFFIX.sub('', name))
        if os.path.exists(previous) and not os.path.exists(final):
            os.replace(previous, final)
        remove(os.path.join(folder, name))
    return stale


def install(tmp, path):
    """Move tmp (a file or a .mlpackage folder, inside work_dir(path)) to path. os.replace cannot swap a
    folder over an existing one: the old one is moved into the work folder first, and back if the move
    of the new one fails. So path always holds a complete export, the new one or the old one."""
    previous = os.path.join(os.path.dirname(tmp), 'previous')
    if os.path.isdir(tmp) and os.path.exists(path):
        os.replace(path, previous)
    try:
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(previous):
            os.replace(previous, path)
        raise


def disk_size(path):
    if os.path.isfile(path):
        return os.path.getsize(path)
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(path) for f in files)


# Ctrl-C and SIGTERM stop a run between two steps of Python code: the export under way raises Stopped,
# its work folder is removed, and `stopping` says in one line what was written. Two steps are not
# stopped halfway (uninterrupted): install's moves, and the removal of a work folder. A signal that
# comes during one stops the run at the next stop_if_asked.
STOP_SIGNALS = {signal.SIGINT: 'Ctrl-C', signal.SIGTERM: 'SIGTERM'}
stopped_by = None  # the stop signal, once one arrived (stopping resets it)
_holding = False  # inside uninterrupted()


class Stopped(BaseException):  # not an Exception: no `except Exception` of ours or of a library catches it
    def __init__(self, signum):
        super().__init__(STOP_SIGNALS[signum])
        self.signum = signum


def stop(signum, frame):
    """The handler of STOP_SIGNALS (installed by stopping). The signal is kept too: a library may turn
    Stopped into an error of its own (torch.onnx does when it arrives during one of its imports)."""
    global stopped_by
    stopped_by = signum
    if not _holding:
        raise Stopped(signum)


def stop_if_asked():
    """Raise Stopped if a stop signal has arrived: one held by uninterrupted, or one whose Stopped a
    library turned into another error."""
    if stopped_by is not None:
        raise Stopped(stopped_by)


@contextlib.contextmanager
def uninterrupted():
    """Ctrl-C and SIGTERM wait until the block is done (see stop_if_asked)."""
    global _holding
    _holding = True
    try:
        yield
    finally:
        _holding = False


@contextlib.contextmanager
def stopping(variants, done):
    """Ctrl-C and SIGTERM raise Stopped in the block. Stopped and CannotWrite end the run with one line
    saying which files were written (done). The previous handlers come back at the end: main may run in
    a process that goes on, as in the tests."""
    global stopped_by
    stopped_by, handlers = None, {signum: signal.signal(signum, stop) for signum in STOP_SIGNALS}
    try:
        yield
    except Stopped as e:
        print(f'export.py: stopped by {e}, the work folder removed; {summary(variants, done)}', file=sys.stderr)
        sys.exit(128 + e.signum)  # as a shell reports a process ended by that signal
    except CannotWrite as e:
        raise SystemExit(f'export.py: {e}: free some space or pass another --out-dir; {summary(variants, done)}')
    finally:
        for signum, handler in handlers.items():
            signal.signal(signum, handler)


def summary(variants, done):
    """-> 'written: ...; not written: ...', the files of this run."""
    written = [f'{t} {w} ({os.path.basename(done[t, w])})' for t, w in variants if (t, w) in done]
    missing = [f'{t} {w}' for t, w in variants if (t, w) not in done]
    return f'written: {", ".join(written) or "nothing"}' + \
        f'; not written: {", ".join(missing)} (any older files of their names kept)' * bool(missing)


class CannotWrite(Exception):
    """The file system refused a write: the run stops (the next files would fail alike)."""


REFUSED = {errno.ENOSPC, errno.EFBIG, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM}


def refused_write(e, folder):
    """Why the file system refused a write of an export that raised e -> a phrase, or None if it did
    not. The writers say so in their own ways:
    - Python's file objects raise OSError (onnx.save, which torch.onnx calls);
    - shutil.copytree (coremltools' save) raises a shutil.Error listing (source, destination, why) per file;
    - C++ writers raise RuntimeError without the errno (coremltools' weight writer: '[MIL FileWriter]:
      Unknown error occurred while writing data to the file.'), or leave a truncated file without a
      word (onnxruntime's quantizer: reading it back fails to parse it).
    So, failing an errno, the file system is asked: is a file size limit (ulimit -f) set, or is the disk
    of folder or of the temporary files (where coremltools and onnxruntime's quantizer write) full?"""
    limit = resource.getrlimit(resource.RLIMIT_FSIZE)[0]
    state = f', under a file size limit of {limit:,} bytes (ulimit -f)' * (limit != resource.RLIM_INFINITY)
    for where in dict.fromkeys((folder, tempfile.gettempdir())):  # each disk once
        if (free := shutil.disk_usage(where).free) < 2 ** 20:
            state += f', {free:,} bytes free on the disk of {where}'
    x = e
    while x is not None:  # e, then the exceptions it was raised from or while handling
        if isinstance(x, shutil.Error) and x.args and isinstance(x.args[0], list) and x.args[0]:
            return x.args[0][0][-1] + state
        if isinstance(x, OSError) and x.errno in REFUSED:
            return (f'{x.strerror}: {x.filename}' if x.filename else x.strerror) + state
        x = x.__cause__ or x.__context__
    return f'{type(e).__name__}: {(str(e).strip().splitlines() or [""])[0]}{state}' if state else None


def failure(name, path, e):
    """An export or check of path that raised e. Raises Stopped if a stop signal came (e may be what a
    library made of it), CannotWrite if the file system refused a write. Else prints why -> False."""
    stop_if_asked()
    if not isinstance(e, CheckFailed) and (why := refused_write(e, os.path.dirname(os.path.abspath(path)))):
        raise CannotWrite(f'{name}: cannot write {path} ({why})') from None
    why = str(e) if isinstance(e, CheckFailed) else traceback.format_exc()
    print(f'{name}: FAILED ({path} not written): {why}', file=sys.stderr)
    return False


# -------------------------------------------------------------------------------------------------
# What compression costs on real frames: each task's main metric on val images
# -------------------------------------------------------------------------------------------------

def open_val(config, data_root, img_size, tasks):
    """The val split of data_root, else of the checkpoint's training data (its config's data_root),
    read at the export size -> a data.py reader. Synthetic scenes are generated there first if missing,
    by the same call as train.py's. Raises DataError / ValueError (a missing dataset or split)."""
    if data_root is None and config['dataset'] == 'synthetic':
        write_synthetic(config)
    return READERS[config['dataset']](data_root or config['data_root'], split='val', train=False, size=img_size,
                                      tasks=tuple(tasks))


def read_frames(val, ids):
    """Samples ids of val, each read once -> dict id -> sample. One that cannot be read (data.DataError:
    a damaged file, an image larger than the export size) is left out with a warning line naming the
    file, and the run goes on with the others."""
    samples = {}
    for i in ids:
        try:
            samples[i] = val[i]
        except DataError as e:
            print(f'export.py: warning: val image {i} skipped: {e}', file=sys.stderr)
    return samples


def val_frames(args, config, img_size, tasks, calibrated):
    """The val frames this run uses, read once before any export: the first --val-images (the metric
    change) and --calib-images spread evenly over the split (ONNX int8's calibration, if calibrated).
    -> (the split's folder, the metric's samples, the calibration frames float32 (N, 3, H, W) in 0-255,
    padded as the contract pads, or None), or a one-line error. Unreadable frames are skipped (read_frames)."""
    if not (args.val_images or calibrated):
        return None, [], None
    try:
        val = open_val(config, args.data_root, img_size, tasks)
    except (DataError, ValueError) as e:
        if args.data_root is not None:
            raise SystemExit(f'export.py: --data-root {args.data_root}: {e}')
        if calibrated:
            raise SystemExit(f'export.py: ONNX int8 is calibrated on val frames, and the val split cannot be read '
                             f'({e}): pass --data-root with a val split')
        print(f'export.py: metric change not measured ({e}): pass --data-root with a val split', file=sys.stderr)
        return None, [], None
    first = range(min(args.val_images, len(val)))
    spread = np.unique(np.linspace(0, len(val) - 1, min(args.calib_images, len(val))).round().astype(int)) \
        if calibrated else []
    ids = sorted({*first, *spread})
    samples = read_frames(val, ids)
    metric = [samples[i] for i in first if i in samples]
    calibration = [samples[i]['image'] for i in spread if i in samples]
    if calibrated and not calibration:
        raise SystemExit(f'export.py: ONNX int8 is calibrated on val frames, and the val split cannot be read (none '
                         f'of the {len(spread)} frames of {val.root} it takes is usable, see above): pass --data-root '
                         f'with a val split')
    if first and not metric:
        print(f'export.py: metric change not measured (none of the first {len(first)} val images of {val.root} is '
              f'usable, see above): pass --data-root with a val split', file=sys.stderr)
    uses = [f'the metric change is measured on {len(metric)} of the first {len(first)} val images'] * bool(metric) + \
        [f'ONNX int8 calibrated on {len(calibration)} of {len(spread)} frames'] * calibrated
    if len(samples) < len(ids) and uses:
        print('export.py: ' + ', '.join(uses), file=sys.stderr)
    return val.root, metric, denormalise(torch.stack(calibration)).numpy() if calibrated else None


def as_scores(task, x, channels):
    """An app output (N, ...) -> what the meters read, the raw head outputs: one-hot scores for a class
    map, the logit of a probability (the meters apply the sigmoid); depth and normals as they are."""
    x, kind = torch.from_numpy(np.asarray(x)), TASK_TABLE[task].kind
    if kind == 'classes':
        return F.one_hot(x.long(), channels).permute(0, 3, 1, 2).float()  # (N, C, H, W)
    if kind == 'binary':
        return torch.logit(x.double())
    if kind in ('depth', 'normals'):
        return x
    raise unknown_kind(task, 'metric of its exported output')


def main_metrics(predict, samples, tasks, dataset):
    """Each task's main metric (TASK_TABLE[task].metric) of predict (frames -> app outputs, as load_onnx
    returns) on val samples (read_frames) -> dict task -> value. They are scored as training's
    evaluation scores them (data.update_meters)."""
    meters = make_meters(tasks, dataset)
    for sample in samples:
        batch = collate([sample])
        out = predict(denormalise(batch['image']).numpy())  # (1, 3, H, W) the frame, 0-255
        update_meters(meters, {t: as_scores(t, out[t], tasks[t]) for t in meters}, batch)
    return {t: m.score()[TASK_TABLE[t].metric] for t, m in meters.items()}


def metric_change(got, base):
    """dict task -> value, for a file and for the fp32 PyTorch model -> one line."""
    return ', '.join(f'{t} {TASK_TABLE[t].metric} {base[t]:.4g} -> {v:.4g} ({v - base[t]:+.2g})' for t, v in got.items())


def metric_measure(model, probabilities, root, samples):
    """-> measure(load, file): a line with the main metrics of the file (loaded by load) on the val
    samples, each against the fp32 PyTorch model's (measured once, at the first file). None without
    samples."""
    base = {}

    def measure(load, file):
        if not samples:
            return None
        predict = load(file)
        if not base:
            base.update(main_metrics(lambda im: reference(model, im, probabilities)[0], samples, model.tasks,
                                     model.config['dataset']))
        got = main_metrics(predict, samples, model.tasks, model.config['dataset'])
        return (f'main metrics on {len(samples)} val images of {root}, fp32 PyTorch -> this file: '
                f'{metric_change(got, base)}')
    return measure


# -------------------------------------------------------------------------------------------------
# Benchmark and command line
# -------------------------------------------------------------------------------------------------

def benchmark(app, files, img_size, runs=20, warmup=3):
    """files: dict (target, weights) -> path. Median latency at batch 1 of eager PyTorch (the same
    AppModel) and of each ONNX file in onnxruntime on this CPU, with every file's size. Next to an int8
    file, for comparison: the fp32 file quantized by the dynamic pass alone (quantize_onnx without
    calibration; not written), which shows what calibrating the convs buys. They run in turn, run by
    run, so other load on the machine slows all alike, with torch's number of threads (OMP_NUM_THREADS
    sets it). Core ML runs on Apple devices only: its latency is for Xcode's Core ML performance report."""
    image = check_images(1, img_size)
    threads = torch.get_num_threads()
    engines = {('PyTorch eager', 'fp32'): lambda: app(torch.from_numpy(image))}
    engines.update({k: functools.partial(load_onnx(p, threads), image) for k, p in files.items() if k[0] == 'onnx'})
    with tempfile.TemporaryDirectory() as tmp:
        if ('onnx', 'int8') in files and ('onnx', 'fp32') in files:
            dynamic = os.path.join(tmp, 'dynamic.onnx')
            quantize_onnx(files['onnx', 'fp32'], dynamic)
            engines['onnx', 'int8 dynamic'] = functools.partial(load_onnx(dynamic, threads), image)
        times = {k: [] for k in engines}
        with torch.inference_mode():
            for i in range(warmup + runs):
                for k, run in engines.items():
                    t = time.perf_counter()
                    run()
                    if i >= warmup:
                        times[k].append(time.perf_counter() - t)
    median = {k: statistics.median(v) for k, v in times.items()}
    t_torch = median['PyTorch eager', 'fp32']
    print(f'benchmark: batch 1, {img_size[0]}x{img_size[1]}, median of {runs} runs after {warmup} warm-up, '
          f'{os.cpu_count()} CPU cores, {threads} thread(s) each:')
    for key in [('PyTorch eager', 'fp32'), *files, *(k for k in median if k not in files and k[0] == 'onnx')]:
        size = f'{disk_size(files[key]) / 2 ** 20:.1f} MiB' if key in files else 'not written' * (key[0] == 'onnx')
        line = f'  {key[0]} {key[1]}'.ljust(22) + size.rjust(11)
        if key in median:
            speed = f'  ({t_torch / median[key]:.2f}x the speed of PyTorch eager)' * (key[0] == 'onnx')
            print(f'{line} {1e3 * median[key]:8.1f} ms{speed}')
        else:
            print(f'{line}  latency: on an Apple device (Xcode\'s Core ML performance report)')


NO_CHECKPOINT = 'train one with `python train.py --dataset synthetic` or pass --checkpoint PATH'


def parse_args():
    """The flags -> (args, the (target, weights) of each file to write), or a one-line error."""
    p = argparse.ArgumentParser(description='Export a trained TaskExpert to ONNX and/or Core ML for apps, '
                                            'each checked against PyTorch.')
    p.add_argument('--target', nargs='+', choices=['onnx', 'coreml', 'all'], default=['all'],
                   help='what to export: onnx, coreml, or several (all = onnx coreml; default all)')
    p.add_argument('--checkpoint', help='a model trained by train.py, .pt or .safetensors (default: the newest run '
                                        'under runs/, its best.pt, else its last.pt)')
    p.add_argument('--out-dir', help='folder for the exported files (default: the checkpoint\'s folder)')
    p.add_argument('--img-size', nargs=2, type=int, metavar=('H', 'W'),
                   help='fixed input size, multiples of 16 (default: the training size)')
    p.add_argument('--weights', nargs='+', choices=WEIGHTS_ORDER,
                   help='weights of each exported file, one file per choice and target: ONNX fp32 or int8 '
                        '(default fp32), Core ML fp32, fp16, int8 or 4bit (default fp16)')
    p.add_argument('--fp32', dest='weights', action='store_const', const=['fp32'], help='the same as --weights fp32')
    p.add_argument('--probabilities', action='store_true',
                   help='also output <task>_prob, the class probabilities, next to each class map')
    p.add_argument('--data-root', help='dataset whose val split measures the metric change of each file '
                                       '(default: the checkpoint\'s training data)')
    p.add_argument('--val-images', type=int, default=50, metavar='N',
                   help='val images for the metric change (default 50, the first ones of the split; 0: none)')
    p.add_argument('--calib-images', type=int, default=32, metavar='N',
                   help='val frames that calibrate ONNX int8 (the input range of each conv), spread over the split '
                        '(default 32)')
    p.add_argument('--benchmark', action='store_true',
                   help='time each ONNX file in onnxruntime against eager PyTorch on this CPU (batch 1), '
                        'with the size of every file')
    args = p.parse_args()
    targets = ['onnx', 'coreml'] if 'all' in args.target else list(dict.fromkeys(args.target))
    # fp32 first: an int8 ONNX file is then quantized from the fp32 one, not exported again
    variants = [(t, w) for t in targets for w in WEIGHTS_ORDER if w in (args.weights or [DEFAULT_WEIGHTS[t]])]
    for t, w in variants:
        if w not in WEIGHTS[t]:
            raise SystemExit(f'export.py: --weights {w} with --target {t}: {NO_WEIGHTS[t, w]}')
    if args.benchmark and 'onnx' not in targets:
        raise SystemExit('export.py: --benchmark times the ONNX model: add onnx to --target')
    if args.val_images < 0:
        raise SystemExit(f'export.py: --val-images {args.val_images}: must be 0 or more')
    if args.calib_images < 1:
        raise SystemExit(f'export.py: --calib-images {args.calib_images}: must be 1 or more')
    if args.out_dir is not None and os.path.exists(args.out_dir) and not os.path.isdir(args.out_dir):
        raise SystemExit(f'export.py: --out-dir {args.out_dir} is a file: pass a folder (made if missing)')
    if args.data_root is not None and not os.path.isdir(args.data_root):
        raise SystemExit(f'export.py: --data-root {args.data_root} is not a folder: pass a dataset folder '
                         f'(README.md, section Datasets)')
    return args, variants


def load_model(args):
    """The checkpoint to export (--checkpoint, else the newest run's) -> (its path, the model at the
    export size, that size), or a one-line error."""
    path = args.checkpoint or newest_checkpoint('runs')
    if path is None:
        raise SystemExit(f'export.py: no checkpoint (best.pt / last.pt) under runs/: {NO_CHECKPOINT}')
    if not os.path.exists(path):
        raise SystemExit(f'export.py: --checkpoint {path} does not exist: {NO_CHECKPOINT}')
    try:
        model = TaskExpert.from_checkpoint(path)
    except (OSError, ValueError) as e:
        raise SystemExit(f'export.py: {e}') from None
    img_size = tuple(args.img_size or model.config['img_size'])
    if img_size[0] % PATCH or img_size[1] % PATCH or min(img_size) <= 0:
        raise SystemExit(f'export.py: --img-size {img_size[0]} {img_size[1]} must be positive multiples of {PATCH}')
    return path, at_size(model, img_size), img_size  # (the copy keeps .config and .step)


def newest_checkpoint(root):
    """The newest run folder under root (by its newest checkpoint): its best.pt, else its last.pt."""
    found = glob.glob(os.path.join(root, '**', 'best.pt'), recursive=True) + \
        glob.glob(os.path.join(root, '**', 'last.pt'), recursive=True)
    if not found:
        return None
    run = os.path.dirname(max(found, key=os.path.getmtime))
    best = os.path.join(run, 'best.pt')
    return best if os.path.isfile(best) else os.path.join(run, 'last.pt')


def open_out_dir(args, checkpoint):
    """--out-dir (default: the checkpoint's folder) -> its path, or a one-line error. It is made if
    missing, and the file system is asked for a file there (an unnamed one, gone when closed): a
    read-only disk or a permission fails here. The work folders of killed exports in it are removed."""
    out_dir = args.out_dir or os.path.dirname(os.path.abspath(checkpoint))
    try:
        os.makedirs(out_dir, exist_ok=True)
        with tempfile.TemporaryFile(dir=out_dir):
            pass
        for name in remove_stale_work(out_dir):
            print(f'export.py: removed {name}, the work folder of an export that was killed')
    except OSError as e:
        what = f'--out-dir {args.out_dir}' if args.out_dir else f"the checkpoint's folder {out_dir}"
        raise SystemExit(f'export.py: {what} cannot be written ({e.strerror or e}): pass --out-dir with a folder you '
                         f'can write to')
    return out_dir


if __name__ == '__main__':
    main()
