"""Export a trained TaskExpert for apps: ONNX and Core ML, each checked against PyTorch.

    python export.py --target onnx                    # newest checkpoint under runs/, training size
    python export.py --target onnx coreml --checkpoint runs/nyud/best.pt --img-size 480 640
    python export.py --target all --fp32 --benchmark  # all = onnx + coreml

The app contract (the same for both targets, one fixed input size H x W):
  input 'image'   RGB, values 0-255. ONNX: float32 (B, 3, H, W), any batch B. Core ML: an image
                  (e.g. a camera frame) of H x W. The ImageNet normalisation is inside the model,
                  folded into the patch-embedding conv (exact: that conv has no padding).
  outputs, one per task, at the input size:
    semseg, human_parts  int32 (B, H, W) class map (argmax); with --probabilities also
                         '<task>_prob' float32 (B, C, H, W), the softmax over the classes
    depth                float32 (B, 1, H, W) metres
    normals              float32 (B, 3, H, W) unit vectors
    edge, sal            float32 (B, 1, H, W) probabilities (sigmoid)
Every target reports its file, size, time and the check it passed. A target whose export or check
fails prints why, the other target still runs, and the script exits non-zero. Files are written to a
temporary path beside the final one and renamed into place only once their check has passed.
"""
import argparse
import copy
import glob
import json
import logging
import os
import platform
import shutil
import statistics
import sys
import time
import traceback

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from data import IMAGENET_MEAN, IMAGENET_STD, NYU40_CLASSES, render_scene
from taskexpert import CLASS_MAP_TASKS, PATCH, TaskExpert, postprocess

VOC_CLASSES = (
    'background', 'aeroplane', 'bicycle', 'bird', 'boat', 'bottle', 'bus', 'car', 'cat', 'chair', 'cow',
    'diningtable', 'dog', 'horse', 'motorbike', 'person', 'pottedplant', 'sheep', 'sofa', 'train', 'tvmonitor')
HUMAN_PARTS = ('background', 'head', 'torso', 'upper arms', 'lower arms and hands', 'upper legs',
               'lower legs and feet')  # the 6 part groups of the InvPT / ATRC PASCAL reader
NO_CHECKPOINT = 'train one with `python train.py --dataset synthetic` or pass --checkpoint PATH'

# -------------------------------------------------------------------------------------------------
# Checkpoint -> model
# -------------------------------------------------------------------------------------------------


def newest_checkpoint(root):
    """The newest run folder under root (by its newest checkpoint): its best.pt, else its last.pt."""
    found = glob.glob(os.path.join(root, '**', 'best.pt'), recursive=True) + \
        glob.glob(os.path.join(root, '**', 'last.pt'), recursive=True)
    if not found:
        return None
    run = os.path.dirname(max(found, key=os.path.getmtime))
    best = os.path.join(run, 'best.pt')
    return best if os.path.isfile(best) else os.path.join(run, 'last.pt')


# -------------------------------------------------------------------------------------------------
# The exported module: normalisation folded in, outputs post-processed for apps
# -------------------------------------------------------------------------------------------------


def at_size(model, img_size):
    """A copy of the model for one fixed input size (H, W): the position embedding is resampled here,
    once (bicubic, set_grid), so that no resampling op lands in the exported graph."""
    model = copy.deepcopy(model).eval()
    model.backbone.set_grid((img_size[0] // PATCH, img_size[1] // PATCH))
    return model


def output_names(tasks, probabilities):
    return [n for t in tasks for n in ((t, t + '_prob') if probabilities and t in CLASS_MAP_TASKS else (t,))]


class AppModel(nn.Module):
    """RGB 0-255 (B, 3, H, W) -> tuple of post-processed outputs, in the order of self.output_names.

    (x / 255 - mean) / std is folded into the patch-embedding conv: conv_w,b((x / 255 - mean) / std)
    = conv_w',b'(x) with w' = w / (255 std_c) and b' = b - sum_{c,i,j} w mean_c / std_c. This is exact
    because the conv (stride 16, kernel 16) has no padding: every tap sees a real pixel. So a Core ML
    ImageType input takes the camera frame as is (scale 1, no bias), with per-channel std exact.
    """

    def __init__(self, model, probabilities=False):
        super().__init__()
        self.model = copy.deepcopy(model)
        self.probabilities = probabilities
        self.output_names = output_names(model.tasks, probabilities)
        self.eval()
        proj = self.model.backbone.patch_embed.proj
        mean = torch.tensor(IMAGENET_MEAN, dtype=torch.float64).view(1, 3, 1, 1)
        std = torch.tensor(IMAGENET_STD, dtype=torch.float64).view(1, 3, 1, 1)
        with torch.no_grad():  # in float64, so the folding adds no rounding of its own
            w = proj.weight.double()  # (C, 3, 16, 16)
            proj.bias.copy_(proj.bias.double() - (w * mean / std).sum((1, 2, 3)))
            proj.weight.copy_(w / (255 * std))

    def forward(self, image):
        return tuple(postprocess(self.model(image), self.probabilities).values())


def reference(model, images, probabilities):
    """What the exported model must output, computed by the PyTorch model (at the export size) with the
    normalisation done explicitly, so the check covers the folding too. images: float32 (B, 3, H, W)
    in 0-255 -> (dict output name -> array, dict task -> raw head output (B, C_t, H, W))."""
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    with torch.no_grad():
        raw = model.eval()((torch.from_numpy(images) / 255 - mean) / std)
    return {k: v.numpy() for k, v in postprocess(raw, probabilities).items()}, {k: v.numpy() for k, v in raw.items()}


def check_images(n, img_size, seed=0):
    """n test frames, float32 (n, 3, H, W) with integer values 0-255 like a camera's: even ones a
    synthetic room (data.render_scene: real-looking, smooth surfaces, edges), odd ones uniform noise
    (every input value, far from the training statistics)."""
    rng = np.random.default_rng(seed)
    frames = [render_scene(rng, img_size)['image'].transpose(2, 0, 1) if i % 2 == 0 else
              rng.integers(0, 256, (3, *img_size)) for i in range(n)]
    return np.stack(frames).astype(np.float32)


def describe(config, tasks, probabilities, img_size, checkpoint, step):
    """-> (metadata dict str -> str, dict output name -> description), shared by both targets."""
    dataset = config['dataset']
    names = {'semseg': VOC_CLASSES if dataset == 'pascal' else NYU40_CLASSES, 'human_parts': HUMAN_PARTS}
    H, W = img_size
    meta = {
        'tasks': ','.join(tasks),
        'classes': json.dumps({t: list(names[t]) for t in tasks if t in CLASS_MAP_TASKS}),
        'input_size': f'{H}x{W}',
        'input': f'RGB image {H}x{W}, values 0-255',
        'normalisation': f'inside the model (folded into the first conv): (x / 255 - mean) / std, '
                         f'ImageNet mean {IMAGENET_MEAN}, std {IMAGENET_STD}',
        'dataset': dataset,
        'backbone': config['backbone'],
        'checkpoint': os.path.abspath(checkpoint),
        'step': str(step),
    }
    text = {
        'semseg': f'semantic class map (B, {H}, {W}) int32: argmax over {len(names["semseg"])} classes, names in '
                  f"metadata 'classes'",
        'human_parts': f'human-part class map (B, {H}, {W}) int32: 0 background, 1 head, 2 torso, 3 upper arms, '
                       '4 lower arms and hands, 5 upper legs, 6 lower legs and feet',
        'depth': f'depth (B, 1, {H}, {W}) float32 in metres',
        'normals': f'surface normals (B, 3, {H}, {W}) float32, unit vectors in the camera frame (x, y, z), '
                   'as in the training data',
        'edge': f'boundary probability (B, 1, {H}, {W}) float32 in [0, 1]',
        'sal': f'saliency probability (B, 1, {H}, {W}) float32 in [0, 1]',
    }
    out = {}
    for name in output_names(tasks, probabilities):
        task = name.removesuffix('_prob')
        out[name] = (f'{task} class probabilities (B, {tasks[task]}, {H}, {W}) float32, softmax over the classes'
                     if name.endswith('_prob') else text[task])
    return meta, out


# -------------------------------------------------------------------------------------------------
# Comparing an exported model's outputs with PyTorch's
# -------------------------------------------------------------------------------------------------

# Check tolerances per kind of output and arithmetic of the exported model. An output value passes
# if |exported - PyTorch| <= tol * max(1, |PyTorch|): absolute for probabilities and unit normals
# (at most 1), relative for depths above 1 m. They sit ~10x above the errors measured on tiny models
# (fp32: 1e-7..2e-5; fp16 run by the Linux checker: 5e-4..4e-3), and far below the errors of a
# conversion bug (a wrong weight, layout or resize mode changes outputs by a good part of their range).
TOLERANCE = {
    'fp32': {'prob': 1e-5, 'depth': 2e-5, 'normals': 2e-4, 'logit': 1e-4},
    'fp16': {'prob': 1e-2, 'depth': 1e-2, 'normals': 5e-2, 'logit': 5e-2},
}


class CheckFailed(Exception):
    pass


def compare(got, ref, raw, tol):
    """got, ref: dict output name -> array; raw: the PyTorch head outputs (see reference). Returns one
    line per output; raises CheckFailed (with those lines) if any output is out of tolerance.

    Two outputs are ill-conditioned where the raw prediction is, so they are judged against it:
    - class maps, as the fraction of pixels that differ. A pixel may differ only at a near-tie, where
      PyTorch's logits of the two classes are within tol['logit'] * max(1, |logit|): there the
      exported model's own rounding can pick the other class. A flip anywhere else is an error.
    - unit normals: a rounding error e of the raw 3-vector turns its direction by about e / |raw|,
      so a pixel's error is scaled by min(1, |raw| / median |raw|) before the test: shorter-than-
      typical raw vectors (e.g. where bilinear upsampling blends opposite normals) may err more."""
    lines, ok = [], True
    for name, r in ref.items():
        g = got[name]
        if g.shape != r.shape:
            passed, line = False, f'{name}: shape {g.shape}, PyTorch {r.shape}'
        elif name in CLASS_MAP_TASKS and ((g < 0) | (g >= raw[name].shape[1])).any():
            passed, line = False, f'{name}: class ids outside 0..{raw[name].shape[1] - 1}'
        elif name in CLASS_MAP_TASKS:
            logits = raw[name]  # (B, C, H, W)
            top = np.take_along_axis(logits, r[:, None].astype(np.int64), 1)[:, 0]  # (B, H, W)
            gap = top - np.take_along_axis(logits, g[:, None].astype(np.int64), 1)[:, 0]  # 0 where equal
            diff = g != r
            bad = int((diff & (gap > tol['logit'] * np.maximum(1, np.abs(top)))).sum())
            passed = bad == 0
            line = (f'{name}: {100 * diff.mean():.4f}% of pixels differ, {bad} not at a near-tie (largest '
                    f'logit gap of a flip {gap[diff].max() if diff.any() else 0:.1e}, limit {tol["logit"]:g})')
        elif name == 'normals':
            err = np.abs(g.astype(np.float64) - r).max(1)  # (B, H, W)
            length = np.linalg.norm(raw['normals'], axis=1)
            scaled = float((err * np.minimum(1, length / np.median(length))).max())
            passed = scaled <= tol['normals']
            line = (f'{name}: max |error| {err.max():.2e}, {scaled:.2e} scaled by the raw length '
                    f'(limit {tol["normals"]:g})')
        else:
            limit = tol['depth' if name == 'depth' else 'prob']
            err = np.abs(g.astype(np.float64) - r)
            passed = bool((err <= limit * np.maximum(1, np.abs(r))).all())
            line = f'{name}: max |error| {err.max():.2e} (limit {limit:g}{" x max(1, |depth|)" * (name == "depth")})'
        lines.append(line + ('' if passed else '  <- OUT OF TOLERANCE'))
        ok &= passed
    if not ok:
        raise CheckFailed('outputs differ from PyTorch:\n    ' + '\n    '.join(lines))
    return lines


# -------------------------------------------------------------------------------------------------
# Writing files: to a temporary path beside the final one, renamed into place when checked
# -------------------------------------------------------------------------------------------------


def temp_path(path):
    base, ext = os.path.splitext(path)
    return f'{base}.tmp-{os.getpid()}{ext}'


def remove(path):
    if os.path.isdir(path):
        shutil.rmtree(path)
    elif os.path.exists(path):
        os.remove(path)


def install(tmp, path):
    """Rename tmp into place. A .mlpackage is a folder, which os.replace cannot swap over an existing
    one: the old one is moved aside first and deleted after, so path is always complete or absent."""
    if os.path.isdir(tmp) and os.path.exists(path):
        old = temp_path(path) + '.old'
        os.replace(path, old)
        os.replace(tmp, path)
        remove(old)
    else:
        os.replace(tmp, path)


def disk_size(path):
    if os.path.isfile(path):
        return os.path.getsize(path)
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(path) for f in files)


# -------------------------------------------------------------------------------------------------
# ONNX
# -------------------------------------------------------------------------------------------------


def export_onnx(app, img_size, path, meta, descriptions):
    """Export with the dynamo exporter at opset 20 (pinned: its default in torch 2.13, the version tested),
    batch dynamic, all weights in the one file."""
    import onnx
    example = torch.from_numpy(check_images(2, img_size))  # batch 2: a batch-1 example fixes the batch to 1
    program = torch.onnx.export(app, (example,), dynamo=True, opset_version=20, input_names=['image'],
                                output_names=app.output_names, dynamic_shapes=({0: torch.export.Dim('batch')},),
                                external_data=False)
    program.model.metadata_props.update(meta)
    program.model.graph.inputs[0].doc_string = meta['input'] + ', float32 (B, 3, H, W)'
    for value in program.model.graph.outputs:
        value.doc_string = descriptions[value.name]
    program.save(path, external_data=False)
    onnx.checker.check_model(path, full_check=True)


def check_onnx(path, model, probabilities, img_size):
    """onnxruntime (CPU) vs PyTorch on a batch of 3 (not the batch of 2 it was exported with)."""
    import onnxruntime as ort
    images = check_images(3, img_size, seed=1)
    session = ort.InferenceSession(path, providers=['CPUExecutionProvider'])
    names = [o.name for o in session.get_outputs()]
    got = dict(zip(names, session.run(None, {'image': images})))
    ref, raw = reference(model, images, probabilities)
    lines = compare(got, ref, raw, TOLERANCE['fp32'])
    return 'onnxruntime CPU vs PyTorch, 3 frames (room, noise, room)', lines


# -------------------------------------------------------------------------------------------------
# Core ML
# -------------------------------------------------------------------------------------------------


def import_coremltools():
    """coremltools, without the warnings it logs on import on Linux (no Core ML framework to load,
    torch newer than it was tested with); its conversion warnings still show."""
    logger = logging.getLogger('coremltools')
    level = logger.level
    logger.setLevel(logging.ERROR)
    import coremltools
    logger.setLevel(level)
    return coremltools


def export_coreml(app, img_size, path, fp16, meta, descriptions):
    """torch.export -> Core ML ML program (iOS 17+), fp16 weights and compute unless fp16=False."""
    ct = import_coremltools()
    H, W = img_size
    program = torch.export.export(app, (torch.zeros(1, 3, H, W),)).run_decompositions({})
    mlmodel = ct.convert(
        program, convert_to='mlprogram', minimum_deployment_target=ct.target.iOS17,
        compute_precision=ct.precision.FLOAT16 if fp16 else ct.precision.FLOAT32,
        # scale 1, no bias: the model normalises itself (AppModel), exactly per channel
        inputs=[ct.ImageType(name='image', shape=(1, 3, H, W), color_layout=ct.colorlayout.RGB, scale=1.0,
                             bias=[0.0, 0.0, 0.0])],
        # float32 outputs (else an fp16 program returns Float16), int32 class maps
        outputs=[ct.TensorType(name=n, dtype=np.int32 if n in CLASS_MAP_TASKS else np.float32)
                 for n in app.output_names])
    mlmodel.author = 'TaskExpert open implementation (export.py)'
    mlmodel.short_description = (f'TaskExpert (Ye & Xu, ICCV 2023) multi-task dense prediction, ViT-{meta["backbone"]} '
                                 f'trained on {meta["dataset"]}: {meta["tasks"].replace(",", ", ")} from one RGB image')
    mlmodel.version = f'step {meta["step"]}'
    mlmodel.user_defined_metadata.update(meta)
    mlmodel.input_description['image'] = meta['input'] + ', e.g. a camera frame scaled to that size'
    for name, text in descriptions.items():
        mlmodel.output_description[name] = text.replace('(B, ', '(1, ')
    mlmodel.save(path)


# The Linux check: Core ML cannot run here, but the saved package's ML program can be read back
# (coremltools' milproto loader, weights from the package's blob file) and executed op by op with
# torch. Each op computes in fp32 and its result is rounded to the dtype the program declares for
# it (fp16 throughout an fp16 package), which models fp16 storage with fp32 accumulation. This
# checks the conversion and the saved weights, not Apple's kernels or the Neural Engine.


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


_GELU = {'EXACT': 'none', 'TANH_APPROXIMATION': 'tanh'}  # MIL gelu mode -> torch's approximate=
_DTYPES = {'fp16': torch.float16, 'fp32': torch.float32, 'int32': torch.int32, 'bool': torch.bool}

# The MIL ops our converted model contains (iOS 17 opset), each on a dict of its named inputs
MIL_OPS = {
    'add': lambda a: a['x'] + a['y'],
    'mul': lambda a: a['x'] * a['y'],
    'real_div': lambda a: a['x'] / a['y'],
    'maximum': lambda a: torch.maximum(a['x'], torch.as_tensor(a['y'])),
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
}


def load_mil_program(package):
    """The main function of the ML program saved in a .mlpackage, with its weights, as a PyMIL Function."""
    ct = import_coremltools()
    from coremltools.converters.mil.frontend.milproto.load import load
    mlmodel = ct.models.MLModel(package, skip_model_load=True)
    spec = mlmodel.get_spec()
    return load(spec, spec.specificationVersion, mlmodel.weights_dir).functions['main']


def _stored(v):
    """fp16 values are kept widened to fp32 (exactly) for the arithmetic of the ops that read them."""
    return v.float() if v.dtype == torch.float16 else v


def _operand(v):
    """Scalars (an axis, epsilon, a flag) as Python numbers, tensors as they are."""
    return v.item() if isinstance(v, torch.Tensor) and v.ndim == 0 else v


def run_mil_program(main, image):
    """Execute an ML program's main function (load_mil_program) on image float32 (1, 3, H, W) in
    0-255 -> dict output name -> array, as described above."""
    from coremltools.converters.mil.mil import types
    env = {name: torch.from_numpy(image) for name in main.inputs}
    for op in main.operations:
        if op.op_type == 'const':  # a weight (read from the blob file) or a parameter such as a shape
            v = op.outputs[0].val
            env[op.outputs[0].name] = v if isinstance(v, str) else _stored(torch.as_tensor(np.asarray(v)))
            continue
        if op.op_type not in MIL_OPS:
            raise NotImplementedError(f'the Core ML checker has no rule for MIL op {op.op_type!r}: add one to MIL_OPS')
        args = {k: [_operand(env[v.name]) for v in var] if isinstance(var, (list, tuple)) else _operand(env[var.name])
                for k, var in op.inputs.items()}  # a list for concat's values
        result = MIL_OPS[op.op_type](args)
        for var, value in zip(op.outputs, result if isinstance(result, (tuple, list)) else (result,)):
            env[var.name] = _stored(value.to(_DTYPES[types.builtin_to_string(var.dtype)]))
    return {v.name: env[v.name].numpy() for v in main.outputs}


def run_coreml(package, images):
    """The package's outputs for frames (N, 3, H, W), run one at a time (its input is one image) ->
    dict output name -> (N, ...) array: Core ML itself on macOS (CPU, Apple's kernels), else the ML
    program interpreter above."""
    if platform.system() == 'Darwin':
        from PIL import Image
        ct = import_coremltools()
        mlmodel = ct.models.MLModel(package, compute_units=ct.ComputeUnit.CPU_ONLY)
        outs = [mlmodel.predict({'image': Image.fromarray(im.transpose(1, 2, 0).astype(np.uint8), 'RGB')})
                for im in images]
    else:
        main = load_mil_program(package)
        outs = [run_mil_program(main, im[None]) for im in images]
    return {k: np.concatenate([np.asarray(o[k]) for o in outs]) for k in outs[0]}


def check_coreml(path, model, probabilities, img_size, fp16):
    """The saved package vs PyTorch on 2 frames (room, noise)."""
    images = check_images(2, img_size, seed=1)
    got = run_coreml(path, images)
    ref, raw = reference(model, images, probabilities)
    lines = compare(got, ref, raw, TOLERANCE['fp16' if fp16 else 'fp32'])
    how = 'Core ML (CPU)' if platform.system() == 'Darwin' else 'its ML program run by the Linux checker'
    return f'{how} vs PyTorch, {"fp16" if fp16 else "fp32"}, 2 frames (room, noise)', lines


# -------------------------------------------------------------------------------------------------
# Benchmark and command line
# -------------------------------------------------------------------------------------------------


def benchmark(app, onnx_path, img_size, runs=20, warmup=3):
    """Median latency at batch 1 of eager PyTorch (the same AppModel) and of onnxruntime on this CPU.
    The two alternate run by run, so that other load on the machine slows both alike."""
    import onnxruntime as ort
    image = check_images(1, img_size)
    session = ort.InferenceSession(onnx_path, providers=['CPUExecutionProvider'])
    engines = {'PyTorch eager': lambda: app(torch.from_numpy(image)),
               'onnxruntime': lambda: session.run(None, {'image': image})}
    times = {name: [] for name in engines}
    with torch.inference_mode():
        for i in range(warmup + runs):
            for name, run in engines.items():
                t = time.perf_counter()
                run()
                if i >= warmup:
                    times[name].append(time.perf_counter() - t)
    t_torch, t_ort = (statistics.median(times[name]) for name in engines)
    print(f'benchmark: batch 1, {img_size[0]}x{img_size[1]}, median of {runs} runs after {warmup} warm-up, '
          f'{os.cpu_count()} CPU cores (torch {torch.get_num_threads()} threads, onnxruntime its default): '
          f'PyTorch eager {1e3 * t_torch:.1f} ms, onnxruntime {1e3 * t_ort:.1f} ms, ratio onnxruntime / '
          f'PyTorch {t_ort / t_torch:.2f} ({t_torch / t_ort:.2f}x {"faster" if t_ort < t_torch else "slower"})')


def run_target(target, path, export, check):
    """Export to a temporary path, check it, rename it into place; print the report. -> True if done."""
    tmp = temp_path(path)
    t0 = time.perf_counter()
    try:
        export(tmp)
        t_export = time.perf_counter() - t0
        how, lines = check(tmp)
        install(tmp, path)
    except Exception as e:
        remove(tmp)
        why = str(e) if isinstance(e, CheckFailed) else traceback.format_exc()
        print(f'{target}: FAILED ({path} not written): {why}', file=sys.stderr)
        return False
    print(f'{target}: {path}\n  size {disk_size(path) / 2 ** 20:.1f} MiB, export {t_export:.1f} s, '
          f'check {time.perf_counter() - t0 - t_export:.1f} s\n  check passed ({how}):\n    ' + '\n    '.join(lines))
    return True


def main():
    p = argparse.ArgumentParser(description='Export a trained TaskExpert to ONNX and/or Core ML for apps, '
                                            'each checked against PyTorch.')
    p.add_argument('--target', nargs='+', choices=['onnx', 'coreml', 'all'], default=['all'],
                   help='what to export: onnx, coreml, or several (all = onnx coreml; default all)')
    p.add_argument('--checkpoint', help='a model trained by train.py, .pt or .safetensors (default: the newest run '
                                        'under runs/, its best.pt, else its last.pt)')
    p.add_argument('--out-dir', help='folder for the exported files (default: the checkpoint\'s folder)')
    p.add_argument('--img-size', nargs=2, type=int, metavar=('H', 'W'),
                   help='fixed input size, multiples of 16 (default: the training size)')
    p.add_argument('--fp32', action='store_true', help='Core ML weights and arithmetic in fp32 (default fp16)')
    p.add_argument('--probabilities', action='store_true',
                   help='also output <task>_prob, the class probabilities, next to each class map')
    p.add_argument('--benchmark', action='store_true',
                   help='time the ONNX model in onnxruntime against eager PyTorch on this CPU (batch 1)')
    args = p.parse_args()
    targets = ['onnx', 'coreml'] if 'all' in args.target else list(dict.fromkeys(args.target))
    if args.benchmark and 'onnx' not in targets:
        raise SystemExit('export.py: --benchmark times the ONNX model: add onnx to --target')

    path = args.checkpoint or newest_checkpoint('runs')
    if path is None:
        raise SystemExit(f'export.py: no checkpoint (best.pt / last.pt) under runs/: {NO_CHECKPOINT}')
    if not os.path.isfile(path):
        raise SystemExit(f'export.py: --checkpoint {path} does not exist: {NO_CHECKPOINT}')
    try:
        model = TaskExpert.from_checkpoint(path)
    except (OSError, ValueError) as e:
        raise SystemExit(f'export.py: {e}') from None
    config, step = model.config, model.step
    img_size = tuple(args.img_size or config['img_size'])
    if img_size[0] % PATCH or img_size[1] % PATCH or min(img_size) <= 0:
        raise SystemExit(f'export.py: --img-size {img_size[0]} {img_size[1]} must be positive multiples of {PATCH}')
    model = at_size(model, img_size)
    app = AppModel(model, args.probabilities)
    meta, descriptions = describe(config, model.tasks, args.probabilities, img_size, path, step)
    out_dir = args.out_dir or os.path.dirname(os.path.abspath(path))
    os.makedirs(out_dir, exist_ok=True)
    stem = os.path.join(out_dir, f'taskexpert_{config["dataset"]}_{config["backbone"]}_{img_size[0]}x{img_size[1]}')
    print(f'export.py: {path} ({config["dataset"]}, ViT-{config["backbone"]}), input {img_size[0]}x{img_size[1]}, '
          f'outputs {", ".join(app.output_names)}')

    ok = {}
    if 'onnx' in targets:
        ok['onnx'] = run_target(
            'onnx', stem + '.onnx', lambda tmp: export_onnx(app, img_size, tmp, meta, descriptions),
            lambda tmp: check_onnx(tmp, model, args.probabilities, img_size))
    if 'coreml' in targets:
        fp16 = not args.fp32
        ok['coreml'] = run_target(
            'coreml', stem + ('_fp16' if fp16 else '_fp32') + '.mlpackage',
            lambda tmp: export_coreml(app, img_size, tmp, fp16, meta, descriptions),
            lambda tmp: check_coreml(tmp, model, args.probabilities, img_size, fp16))
    if args.benchmark and ok['onnx']:
        benchmark(app, stem + '.onnx', img_size)
    if not all(ok.values()):
        raise SystemExit(f'export.py: failed: {", ".join(t for t, done in ok.items() if not done)}')


if __name__ == '__main__':
    main()
