"""TaskExpert (Hanrong Ye, Dan Xu, ICCV 2023, arXiv 2307.15324): the model, its loss, what it takes and returns.

The authors never released code; this is an independent reading of the paper. It states (abstract, Fig. 2):
experts decompose a backbone feature into task-generic features; a gate per task assembles them per
sample; MMoE modules sit at several backbone layers; a multi-task feature memory is read as one more
expert and written at each MMoE; the memory after the last MMoE feeds each task's prediction. The rest
is ours: marked [ours], a named option of `TaskExpert` where it is a choice ([paper]: stated there).

Notation (the paper's): X_l the tokens after backbone block l, (B, N, C) with N = (H/16)(W/16); T tasks;
E experts; D expert width; Z_e expert features; g_t the gate of task t; M_t the memory of task t.
Part I: tasks -> ViT -> MMoE -> heads -> TaskExpert -> loss -> normalise, postprocess, predict.
"""
import contextlib, errno, json, math, os, re
from typing import NamedTuple

import numpy as np
import safetensors.torch
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image, ImageOps
from torch.utils.checkpoint import checkpoint

# ---- The tasks of the paper's two benchmarks, NYUD-v2 and PASCAL-Context -----------------------------------

# Output channels of each task's head, per dataset (the synthetic scenes use the NYUD layout).
TASKS = {
    'nyud': {'semseg': 40, 'depth': 1, 'normals': 3, 'edge': 1},
    'pascal': {'semseg': 21, 'human_parts': 7, 'sal': 1, 'normals': 3, 'edge': 1},
}
TASK_SET = {'nyud': 'nyud', 'pascal': 'pascal', 'synthetic': 'nyud'}  # train.py's --dataset -> key of TASKS


class Task(NamedTuple):
    """A row of the task table: everything the code knows of a task. Its kind is what its head predicts:
      kind     head output      loss (MultiTaskLoss)   postprocess
      classes  C logits         cross-entropy          argmax: class ids
      binary   1 logit          balanced BCE           sigmoid: probability
      normals  3 values         L1 of the unit vector  unit vector
      depth    1 value, metres  L1                     as is
    """
    kind: str
    loss_weight: float  # ATRC / InvPT: NYUD semseg 1, depth 1, normals 10, edge 50; PASCAL 1, 2, 5, 10, 50
    metric: str  # its main metric, reported in the paper's tables: a key of its meter's scores
    higher: bool  # whether a higher main metric is better
    meter: str  # the meter that scores it (data.METERS)
    what: str  # its output in words, for the exported models' descriptions
    pos_weight: float = None  # binary: the positives' weight w in the balanced BCE (None: the batch's share of negatives)
    balances_crop: bool = False  # the training crop is drawn again while one of its classes dominates
    needs_foreground: bool = False  # a training crop without a foreground class says nothing: all void


TASK_TABLE = {
    'semseg': Task('classes', 1.0, 'mIoU', True, 'segmentation', 'semantic class map', balances_crop=True),
    'human_parts': Task('classes', 2.0, 'mIoU', True, 'segmentation', 'human-part class map', needs_foreground=True),
    'sal': Task('binary', 5.0, 'maxF', True, 'saliency', 'saliency probability'),
    'normals': Task('normals', 10.0, 'mean', False, 'normals', 'surface normals, unit vectors in the camera frame'),
    'depth': Task('depth', 1.0, 'rmse', False, 'depth', 'depth in metres'),
    'edge': Task('binary', 50.0, 'odsF', True, 'boundary', 'boundary probability', pos_weight=0.95),
}
IGNORE_INDEX = 255  # void / padding in the targets of the 'classes' and 'binary' tasks


def unknown_kind(task, what):  # the error of a switch on the kind without a case for it (a new kind)
    return ValueError(f'task {task!r} of kind {TASK_TABLE[task].kind!r}: no {what} for this kind')

# ---- ViT backbone: timm's names and arithmetic, so ImageNet checkpoints load strictly ----------------------

# preset -> (embed dim C, depth, heads, MMoE taps (1-based blocks), expert width D, drop-path)
VIT_PRESETS = {
    'tiny': dict(embed_dim=192, depth=12, num_heads=3, taps=(3, 6, 9, 12), expert_dim=256, drop_path=0.0),
    'small': dict(embed_dim=384, depth=12, num_heads=6, taps=(3, 6, 9, 12), expert_dim=256, drop_path=0.0),
    'base': dict(embed_dim=768, depth=12, num_heads=12, taps=(3, 6, 9, 12), expert_dim=512, drop_path=0.15),
    'large': dict(embed_dim=1024, depth=24, num_heads=16, taps=(6, 12, 18, 24), expert_dim=768, drop_path=0.15),
}
PATCH = 16


def drop_path(x, p, training):  # stochastic depth: drop the residual branch per sample with probability p
    if p == 0.0 or not training:
        return x
    keep = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(1.0 - p)
    return x * keep / (1.0 - p)


class PatchEmbed(nn.Module):
    """16x16 patches -> tokens: a stride-16 conv, no padding. (B, 3, H, W) -> (B, N, C)."""

    def __init__(self, dim):
        super().__init__()
        self.proj = nn.Conv2d(3, dim, PATCH, PATCH)

    def forward(self, x):
        return self.proj(x).flatten(2).transpose(1, 2)


class Attention(nn.Module):
    """Multi-head self-attention with one fused qkv projection (with bias), as timm."""

    def __init__(self, dim, num_heads):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, dim * 3)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        B, N, C = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, C // self.num_heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)  # each (B, heads, N, C / heads)
        x = F.scaled_dot_product_attention(q, k, v)  # softmax(q k^T / sqrt(d)) v, fused where possible
        return self.proj(x.transpose(1, 2).reshape(B, N, C))


class Mlp(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.fc1 = nn.Linear(dim, 4 * dim)
        self.act = nn.GELU()  # exact (erf) GELU: the tanh form differs, and Core ML silently swaps it
        self.fc2 = nn.Linear(4 * dim, dim)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    """Pre-norm transformer block: x + Attn(LN(x)), then x + MLP(LN(x)); LayerNorm eps 1e-6."""

    def __init__(self, dim, num_heads, drop_path):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim)
        self.drop_path = drop_path

    def forward(self, x):
        x = x + drop_path(self.attn(self.norm1(x)), self.drop_path, self.training)
        return x + drop_path(self.mlp(self.norm2(x)), self.drop_path, self.training)


class VisionTransformer(nn.Module):
    """ViT-{tiny,small,base,large}/16 with class token and learned absolute position embedding. The
    position embedding lives at the training grid (img_size / 16): a checkpoint's is resampled at load."""

    def __init__(self, embed_dim, depth, num_heads, img_size, drop_path=0.0):
        super().__init__()
        self.grid = (img_size[0] // PATCH, img_size[1] // PATCH)
        self.patch_embed = PatchEmbed(embed_dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + self.grid[0] * self.grid[1], embed_dim))
        # stochastic depth grows linearly with depth, as in timm / DeiT
        self.blocks = nn.ModuleList(Block(embed_dim, num_heads, p) for p in np.linspace(0, drop_path, depth).tolist())
        self.norm = nn.LayerNorm(embed_dim, eps=1e-6)
        init_vit(self)  # [ours] from scratch: a 2-D sine-cosine position start; ImageNet weights replace it

    def forward_features(self, x, taps, recompute=False):
        """(B, 3, H, W) -> [X_l for l in taps], each (B, N, C) without the class token; the blocks after the
        last tap are not run. recompute: activation checkpointing (a block runs again in backward)."""
        grid = (x.shape[-2] // PATCH, x.shape[-1] // PATCH)
        x = self.patch_embed(x)  # (B, N, C)
        pos = self.pos_embed
        if grid != self.grid:  # an input size other than the training size: resample for this call
            pos = resample_pos_embed(pos, grid, self.grid)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + pos  # (B, 1 + N, C)
        tapped = []
        for i, blk in enumerate(self.blocks[:max(taps)]):
            # (drop-path masks are drawn again in the recomputation, from the same saved RNG state)
            x = checkpoint(blk, x, use_reentrant=False) if recompute else blk(x)
            if i + 1 in taps:
                tapped.append(x[:, 1:])
        # the last tap goes through the final LayerNorm, the earlier ones are the raw residual stream, as the
        # authors' ViT taps (InvPT models/transformers/vit.py `x = self.norm(x)[:, 1:]`; TaskPrompter, MLoRE)
        tapped[-1] = self.norm(tapped[-1])
        return tapped


# ---- Memorial Mixture-of-Experts (paper Sec. 3, Fig. 2) ----------------------------------------------------
class MMoE(nn.Module):
    """One MMoE module, at backbone block l.

    Experts (shared by all tasks) decompose X_l into E task-generic features          [paper]
        Z_e = GELU(LN_e(W_e X_l)),                                  each (B, N, D)     [ours]
    and a gate per task mixes them, per sample, with the task's memory M_t as an extra expert [paper]
        g_t = softmax(W_t [X_l ; mean_N(X_l)] + b_t)                 over E (+1)       [ours]
        F_t = sum_e g_t,e Z_e + g_t,E+1 M_t                          (B, N, D)         [paper]
    after which the memory is written at this MMoE                                     [paper]
        M_t <- F_t ('replace', default) or M_t + F_t ('add')                           [ours]
    At the first MMoE the memory is still empty: its gates weigh the E experts only.  [ours]

    The gate sees each token with the image's mean token (its context); gate='image' mixes once per image,
    from the mean of the token logits; gate='static' (ablation): every task reads the experts' mean.
    """

    def __init__(self, tasks, in_dim, *, num_experts, expert_dim, first, gate, memory_write):
        super().__init__()
        self.E, self.D, self.first = num_experts, expert_dim, first
        self.gate_mode, self.memory_write, self.tasks = gate, memory_write, list(tasks)
        # E experts in one Linear, C -> E*D, then a LayerNorm per expert (own affine parameters)
        self.experts = nn.Linear(in_dim, num_experts * expert_dim)
        self.expert_norm_weight = nn.Parameter(torch.ones(num_experts, expert_dim))
        self.expert_norm_bias = nn.Parameter(torch.zeros(num_experts, expert_dim))
        n_candidates = num_experts if first else num_experts + 1
        self.gates = nn.ModuleDict({} if gate == 'static' else {t: nn.Linear(2 * in_dim, n_candidates) for t in tasks})

    def expert_features(self, h):
        """h = W_e X_l (B, N, E, D) -> Z_e = GELU(LN_e(h)) (B, N, E, D), cast back to h's dtype once."""
        z = F.layer_norm(h, (self.D,), eps=1e-6) * self.expert_norm_weight + self.expert_norm_bias
        return F.gelu(z).to(h.dtype)

    def forward(self, x, memory):
        """x: X_l (B, N, C); memory: dict task -> M_t (B, N, D), None at the first MMoE -> (the new memory,
        the gate weights: dict task -> (B, N, E or E+1), empty for gate='static')."""
        B, N, _ = x.shape
        h = self.experts(x).reshape(B, N, self.E, self.D)  # in the autocast dtype, if any
        if self.training and torch.is_grad_enabled():  # recompute LN + GELU in backward: saves 3 fp32 copies
            z = checkpoint(self.expert_features, h, use_reentrant=False)
        else:
            z = self.expert_features(h)  # (B, N, E, D): the E task-generic features Z_e
        if self.gate_mode == 'static':  # one feature shared by all tasks: g_t,e = 1/E, fixed
            f = z.mean(dim=2)  # (B, N, D)
            return {t: f for t in self.tasks}, {}
        # (B, N, 2C), cast once to the dtype the gates compute in (autocast would cast it per task)
        context = torch.cat([x, x.mean(dim=1, keepdim=True).expand(-1, N, -1)], dim=-1).to(h.dtype)
        new_memory, weights = {}, {}
        for t, gate in self.gates.items():
            logits = gate(context).float()  # (B, N, E[+1]); the softmax in fp32, also under autocast
            if self.gate_mode == 'image':
                logits = logits.mean(dim=1, keepdim=True)  # (B, 1, E[+1]): one mixture per image
            g = logits.softmax(dim=-1).to(z.dtype).expand(B, N, -1)
            if self.first:
                f = torch.einsum('bne,bned->bnd', g, z)  # read the experts
            else:  # read the experts, and the memory as the (E+1)-th expert
                f = torch.einsum('bne,bned->bnd', g[..., :self.E], z) + g[..., self.E:] * memory[t]
                if self.memory_write == 'add':
                    f = f + memory[t]
            new_memory[t], weights[t] = f, g.detach()
        return new_memory, weights


# ---- Task heads and the whole model ------------------------------------------------------------------------
class TaskHead(nn.Module):
    """A task's decoder on the final memory (input: [paper]; design: [ours], the paper gives none):
    (B, N, D) -> (B, D, H/16, W/16) -> bilinear x4 -> Conv3x3+BN+GELU -> Conv1x1 -> bilinear to (H, W)."""

    def __init__(self, dim, out_channels):
        super().__init__()
        self.conv = nn.Conv2d(dim, dim, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(dim)
        self.pred = nn.Conv2d(dim, out_channels, 1)

    def forward(self, m, grid, size):
        x = m.transpose(1, 2).reshape(m.shape[0], -1, *grid)  # (B, D, H/16, W/16)
        x = F.interpolate(x, scale_factor=4, mode='bilinear', align_corners=False)
        x = F.gelu(self.bn(self.conv(x)))  # (B, D, H/4, W/4), in the autocast dtype if any
        # the prediction itself in fp32, also under autocast, as the reference: bf16's 8-bit mantissa (depth
        # 3 m +- 0.012 m) would reach the loss, the meters and the files; the 1x1 conv is ~0.1 % of the FLOPs
        autocast = x.device.type in ('cpu', 'cuda') and torch.is_autocast_enabled(x.device.type)
        with torch.autocast(x.device.type, enabled=False) if autocast else contextlib.nullcontext():
            x = self.pred(x.float())  # (B, out, H/4, W/4)
            return F.interpolate(x, size=size, mode='bilinear', align_corners=False)  # (B, out, H, W)


ABLATIONS = ('none', 'no-memory', 'static')  # TaskExpert(ablation=...): the parts removed


class TaskExpert(nn.Module):
    """ViT backbone + an MMoE at each tapped block + one head per task on the final memory.

    tasks: dict task -> output channels (TASKS). Options, with our defaults:
      backbone       'tiny' | 'small' | 'base' | 'large' ([paper]: large on NYUD, base on PASCAL)
      img_size       training size (H, W), divisible by 16: the position embedding's grid
      num_experts    E, the shared experts of each MMoE ([ours]: 8)
      expert_dim     D, the expert width ([ours]: 256 tiny / small, 512 base, 768 large)
      taps           1-based blocks carrying an MMoE ([paper]: several; [ours]: 4 evenly spaced, the last included)
      gate           'token' (a mixture per token) | 'image' (one per image)
      memory_write   'replace' (M_t <- F_t) | 'add' (M_t <- M_t + F_t)
      drop_path      stochastic depth (default 0.15 for base / large, 0 for tiny / small)
      grad_checkpoint  'off' | 'mmoe' | 'all': recompute the MMoEs (+1 % FLOPs) or the blocks too (+17 %) in backward
      ablation       'none' | 'no-memory' (one MMoE, at one tap) | 'static' (that MMoE without gates: its
                     experts averaged): what each part buys (docs/results.md, 'Ablation')
    A bad option raises ValueError('<option> <value>: what is wrong'); the scripts name their flag."""

    def __init__(self, tasks, backbone='large', img_size=(448, 576), num_experts=8, expert_dim=None,
                 taps=None, gate='token', memory_write='replace', drop_path=None, grad_checkpoint='off',
                 ablation='none'):
        super().__init__()
        p = VIT_PRESETS.get(backbone, {})
        self.tasks, self.ablation, self.grad_checkpoint = dict(tasks), ablation, grad_checkpoint
        self.taps = tuple(default_taps(backbone, ablation) if taps is None else taps)
        expert_dim = expert_dim or p.get('expert_dim')
        check_options(self, backbone=backbone, img_size=img_size, num_experts=num_experts, expert_dim=expert_dim,
                      gate=gate, memory_write=memory_write)
        self.backbone = VisionTransformer(p['embed_dim'], p['depth'], p['num_heads'], img_size,
                                          p['drop_path'] if drop_path is None else drop_path)
        self.mmoe = nn.ModuleList(
            MMoE(self.tasks, p['embed_dim'], num_experts=num_experts, expert_dim=expert_dim, first=i == 0,
                 gate='static' if ablation == 'static' else gate, memory_write=memory_write)
            for i in range(len(self.taps)))
        self.heads = nn.ModuleDict({t: TaskHead(expert_dim, c) for t, c in self.tasks.items()})
        # blocks after the last tap are not run: frozen (DDP fails on parameters without a gradient), kept
        # so that ImageNet checkpoints load strictly
        self.backbone.blocks[self.taps[-1]:].requires_grad_(False)

    def forward(self, x):  # x (B, 3, H, W) ImageNet-normalised -> dict task -> raw prediction (B, C_t, H, W)
        return self.forward_with_gates(x)[0]

    def forward_with_gates(self, x):
        """-> (the predictions, the gate weights of each MMoE: [tap] dict task -> (B, N, E or E+1))."""
        grid = (x.shape[-2] // PATCH, x.shape[-1] // PATCH)
        recompute = self.grad_checkpoint if self.training and torch.is_grad_enabled() else 'off'
        tapped = self.backbone.forward_features(x, self.taps, recompute=recompute == 'all')
        memory, gates = None, []
        for mmoe, x_l in zip(self.mmoe, tapped):
            if recompute == 'off':
                memory, g = mmoe(x_l, memory)
            else:  # keep X_l and the memory for backward, run the MMoE again there
                memory, g = checkpoint(mmoe, x_l, memory, use_reentrant=False)
            gates.append(g)
        # the memory after the last MMoE feeds every task's final prediction (paper Fig. 2)
        return {t: head(memory[t], grid, x.shape[-2:]) for t, head in self.heads.items()}, gates

    @classmethod
    def from_config(cls, config):
        """An untrained model from train.py's settings (config.json, or the config saved with a model):
        the dataset's tasks that config['tasks'] names, and the model's options."""
        tasks = {t: c for t, c in TASKS[TASK_SET[config['dataset']]].items() if t in config['tasks']}
        return cls(tasks, img_size=tuple(config['img_size']), taps=tuple(config['taps']), **{k: config[k] for k in (
            'backbone', 'num_experts', 'expert_dim', 'gate', 'memory_write', 'grad_checkpoint', 'ablation')})

    @classmethod
    def from_checkpoint(cls, path):
        """A trained model from train.py's best.safetensors or a .pt checkpoint, on the CPU, in eval mode,
        with its settings and training step as model.config and model.step (see read_checkpoint)."""
        ckpt = read_checkpoint(path)
        model = cls.from_config(ckpt['config'])
        load_weights(model, ckpt['model'], path)
        model.config, model.step = ckpt['config'], ckpt['step']
        return model.eval()


# ---- The loss: the paper states none; the reference's (MTI-Net -> ATRC -> InvPT / TaskPrompter) ------------
def depth_valid(target):  # 0 marks missing depth and padding; 255 is the reference's pad value
    return (target > 0) & (target != IGNORE_INDEX)


def normals_valid(target):  # (B, 1, H, W): the zero vector marks missing normals and padding
    return (target != 0).any(dim=1, keepdim=True)


def balanced_bce(logit, target, pos_weight=None):
    """Binary cross-entropy weighing positives w and negatives 1 - w, mean over the valid (non-255)
    pixels, as the reference BalancedBinaryCrossEntropyLoss. pos_weight None: w = the batch's share of
    negatives (saliency); else w = pos_weight. logit, target (B, 1, H, W)."""
    valid = target != IGNORE_INDEX
    y = (target == 1).float()
    n = valid.sum()
    if pos_weight is None:
        w = ((1 - y) * valid).sum() / n.clamp(min=1)  # no positive -> w = 1 -> negatives weigh 0
    else:
        w = pos_weight  # a Python float: a tensor made here would be a host-to-device copy every step
    # softplus(-x) = -log sigmoid(x), softplus(x) = -log(1 - sigmoid(x)), both stable
    loss = w * y * F.softplus(-logit) + (1 - w) * (1 - y) * F.softplus(logit)
    return (loss * valid).sum() / n.clamp(min=1)


class MultiTaskLoss(nn.Module):
    """Weighted sum of the per-task losses in fp32; weights and positive weights the task table's unless given.
    `total, per_task = loss_fn(outputs, batch)` (task -> (B, C, H, W)); no valid pixel adds 0, never NaN."""

    def __init__(self, tasks, weights=None, pos_weights=None):
        super().__init__()
        self.tasks = list(tasks)
        if unknown := [t for t in self.tasks if t not in TASK_TABLE]:
            raise ValueError(f'MultiTaskLoss: unknown task(s) {unknown}; known: {sorted(TASK_TABLE)}')
        self.weights = {t: float((weights or {}).get(t, TASK_TABLE[t].loss_weight)) for t in self.tasks}
        self.pos_weights = {t: (pos_weights or {}).get(t, TASK_TABLE[t].pos_weight) for t in self.tasks}

    def task_loss(self, task, pred, target):
        pred, kind = pred.float(), TASK_TABLE[task].kind
        if kind == 'classes':
            # CE summed over valid pixels / their count (reference CrossEntropyLoss: sum / max(n, 1))
            target = target.long()
            n = (target != IGNORE_INDEX).sum()
            return F.cross_entropy(pred, target, ignore_index=IGNORE_INDEX, reduction='sum') / n.clamp(min=1)
        if kind == 'binary':
            return balanced_bce(pred, target, self.pos_weights[task])
        if kind == 'normals':
            # reference L1Loss(normalize=True): |unit(pred) - gt| summed over the 3 components, averaged
            # over valid pixels; gt is the decoded 2 v / 255 - 1, not renormalised (data.decode_normals)
            valid = normals_valid(target)
            err = (F.normalize(pred, p=2, dim=1) - target).abs() * valid
            return err.sum() / valid.sum().clamp(min=1)
        if kind == 'depth':  # L1 in metres over the valid pixels
            valid = depth_valid(target)
            return ((pred - target).abs() * valid).sum() / valid.sum().clamp(min=1)
        raise unknown_kind(task, 'loss')

    def forward(self, outputs, batch):
        per_task = {t: self.task_loss(t, outputs[t], batch[t]) for t in self.tasks}
        total = sum(self.weights[t] * per_task[t] for t in self.tasks)
        return total, per_task

# ---- What a model takes and returns (predict and the exported models share these) --------------------------

IMAGENET_MEAN = (0.485, 0.456, 0.406)  # the statistics of the ImageNet-pretrained ViTs' inputs
IMAGENET_STD = (0.229, 0.224, 0.225)


def normalise(rgb):
    """RGB 0-255 (..., 3, H, W), any dtype and device -> the model's input, float32 (x / 255 - mean) / std."""
    mean, std = (torch.tensor(v, device=rgb.device).view(3, 1, 1) for v in (IMAGENET_MEAN, IMAGENET_STD))
    return (rgb.float() / 255 - mean) / std


NORMALS_EPS = 1e-4  # the smallest normal fp16 number is 6e-5: a raw normal shorter than this has no direction


def postprocess(raw, probabilities=False):
    """Raw head outputs (dict task -> (B, C_t, H, W)) -> dict output name -> what an app wants."""
    out = {}
    for task, x in raw.items():
        kind = TASK_TABLE[task].kind
        if kind == 'classes':
            out[task] = x.argmax(1).to(torch.int32)  # (B, H, W)
            if probabilities:
                out[task + '_prob'] = x.softmax(1)  # (B, C, H, W)
        elif kind == 'normals':
            out[task] = F.normalize(x, dim=1, eps=NORMALS_EPS)  # (B, 3, H, W) unit vectors
        elif kind == 'binary':
            out[task] = x.sigmoid()  # (B, 1, H, W) probabilities
        elif kind == 'depth':  # metres, never negative (as the saved .mat files)
            out[task] = x.clamp(min=0)
        else:
            raise unknown_kind(task, 'post-processing')
    return out


@torch.no_grad()
def predict(model, image, probabilities=False):
    """One image of any size (a PIL image as it is shown, EXIF orientation applied, or an (H, W, 3) uint8
    array) -> the predictions at its size, post-processed, as numpy: class ids int32 (H, W) (and with
    probabilities '<task>_prob' (C, H, W)), depth (1, H, W) metres, normals (3, H, W), probabilities (1, H, W).
    As in evaluation: shrunk to fit if larger, normalised, padded at the bottom / right to the network size."""
    image = rgb_image(image)
    H, W = model.backbone.grid[0] * PATCH, model.backbone.grid[1] * PATCH
    s = min(1.0, H / image.height, W / image.width)
    h, w = min(H, max(1, round(image.height * s))), min(W, max(1, round(image.width * s)))
    fitted = image if s == 1 else image.resize((w, h), Image.BILINEAR)
    x = normalise(torch.from_numpy(np.array(fitted)).permute(2, 0, 1))  # (3, h, w)
    x = F.pad(x, (0, W - w, 0, H - h))[None]  # (1, 3, H, W): padded with 0, the mean colour, as data.py pads
    size, out = (image.height, image.width), {}
    for t, o in model.eval()(x.to(next(model.parameters()).device)).items():
        o = o[..., :h, :w].float()  # (1, C_t, h, w): the image's content
        if TASK_TABLE[t].kind == 'classes' and not probabilities:
            out[t] = class_ids(o, size)
        else:
            out.update(postprocess({t: F.interpolate(o, size=size, mode='bilinear', align_corners=False)},
                                   probabilities))
    return {name: v[0].cpu().numpy() for name, v in out.items()}


# Part II: the machinery behind the model: option checks, position embeddings, images, ImageNet weights, files
# ---- Checks and initialisation -----------------------------------------------------------------------------
def default_taps(backbone, ablation='none'):
    """The MMoE taps of a backbone preset: 4 evenly spaced blocks; an ablated model's one, the last."""
    taps = VIT_PRESETS[backbone]['taps'] if backbone in VIT_PRESETS else ()
    return taps if ablation == 'none' else taps[-1:]


def check_options(model, *, backbone, img_size, num_experts, expert_dim, gate, memory_write):
    """TaskExpert's options -> ValueError('<option> <value>: what is wrong') for the first bad one."""
    if backbone not in VIT_PRESETS:
        raise ValueError(f'backbone {backbone}: choose one of {", ".join(VIT_PRESETS)}')
    if min(img_size) <= 0 or img_size[0] % PATCH or img_size[1] % PATCH:
        raise ValueError(f'img_size {img_size[0]} {img_size[1]}: both must be positive and divisible by {PATCH}')
    if gate not in ('token', 'image'):
        raise ValueError(f'gate {gate}: must be token or image')
    if memory_write not in ('replace', 'add'):
        raise ValueError(f'memory_write {memory_write}: must be replace or add')
    if model.grad_checkpoint not in ('off', 'mmoe', 'all'):
        raise ValueError(f'grad_checkpoint {model.grad_checkpoint}: must be off, mmoe or all')
    if model.ablation not in ABLATIONS:
        raise ValueError(f'ablation {model.ablation}: must be one of {", ".join(ABLATIONS)}')
    depth, taps = VIT_PRESETS[backbone]['depth'], ' '.join(map(str, model.taps))
    if not model.taps or any(not 1 <= l <= depth for l in model.taps) or list(model.taps) != sorted(set(model.taps)):
        raise ValueError(f'taps {taps}: must be increasing blocks in 1..{depth} for the {backbone} backbone')
    if model.ablation != 'none' and len(model.taps) != 1:
        raise ValueError(f'taps {taps}: an ablated model (ablation {model.ablation}) has one MMoE: give one tap')
    for name, v in (('num_experts', num_experts), ('expert_dim', expert_dim)):
        if v < 1:
            raise ValueError(f'{name} {v}: must be at least 1')


def init_vit(vit):
    """A ViT's initialisation from scratch (timm's): truncated-normal Linear weights, zero biases, a
    near-zero class token; [ours] the position embedding a 2-D sine-cosine code (as MAE / MoCo v3),
    which gives every token its row and column from step 1 (depth leans on it: docs/results.md)."""
    with torch.no_grad():
        vit.pos_embed[0, 1:] = sincos_pos_embed(vit.grid, vit.pos_embed.shape[-1])
    nn.init.normal_(vit.cls_token, std=1e-6)
    for m in vit.modules():
        if isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=0.02)
            nn.init.zeros_(m.bias)


def sincos_pos_embed(grid, dim):
    """Fixed 2-D position codes (h*w, dim): sin and cos of the row, then of the column, each at dim/4
    geometric frequencies 1 ... 1/10000 (the Transformer's sinusoidal code, once per axis)."""
    omega = 1.0 / 10000 ** (torch.arange(dim // 4) / (dim // 4))  # (dim/4,)
    rows, cols = torch.meshgrid(torch.arange(grid[0]), torch.arange(grid[1]), indexing='ij')
    angles = [a.reshape(-1, 1).float() * omega for a in (rows, cols)]  # 2 x (h*w, dim/4)
    return torch.cat([f(a) for a in angles for f in (torch.sin, torch.cos)], dim=1)


def resample_pos_embed(pos_embed, grid, old_grid=None):
    """A learned position embedding (1, 1 + h0*w0, C) resampled to the grid (h, w): bicubic in fp32,
    antialiased as timm; the class-token slot kept. old_grid (h0, w0): the grid it was learnt at; None:
    square if its patch count is a square (a timm checkpoint's: 24x24 for a 384 model, even where h x w
    has as many patches), else (h, w) itself (one saved at this grid, e.g. a fine-tuned backbone)."""
    cls_pos, patch_pos = pos_embed[:, :1], pos_embed[:, 1:]
    if old_grid is None:
        side = math.isqrt(patch_pos.shape[1])
        if side * side != patch_pos.shape[1] and patch_pos.shape[1] != grid[0] * grid[1]:
            raise ValueError(f'position embedding with {patch_pos.shape[1]} patches: neither a square grid nor '
                             f'{grid[0]}x{grid[1]}')
        old_grid = (side, side) if side * side == patch_pos.shape[1] else tuple(grid)
    if tuple(old_grid) == tuple(grid):
        return pos_embed
    C = pos_embed.shape[-1]
    patch_pos = patch_pos.float().reshape(1, *old_grid, C).permute(0, 3, 1, 2)  # (1, C, h0, w0)
    patch_pos = F.interpolate(patch_pos, size=tuple(grid), mode='bicubic', align_corners=False, antialias=True)
    patch_pos = patch_pos.permute(0, 2, 3, 1).reshape(1, grid[0] * grid[1], C).to(pos_embed.dtype)
    return torch.cat([cls_pos, patch_pos], dim=1)


def set_grid(vit, grid):
    """Resample a ViT's position embedding in place to a new token grid (h, w) (export: a fixed size)."""
    with torch.no_grad():
        vit.pos_embed = nn.Parameter(resample_pos_embed(vit.pos_embed.data, grid, vit.grid))
    vit.grid = tuple(grid)


# ---- Images as predict() takes them ------------------------------------------------------------------------
# The image modes read as 8-bit RGB exactly, and what reading them so does (None: nothing), for the dataset
# readers (data.py) and predict alike; every other mode (CMYK, ...) would be misread by PIL's conversion
# and is refused, but predict's greyscale of more than 8 bits, scaled from its full range (GREY_RANGES)
RGB_READS = {'RGB': None, 'RGBA': 'their alpha channel dropped', 'L': 'greyscale, read as RGB (grey in R, G, B)',
             'LA': 'greyscale, read as RGB (grey in R, G, B)', 'P': 'palette colours, read as RGB',
             'PA': 'palette colours, read as RGB', '1': 'black and white, read as RGB (0 and 255)'}
GREY_RANGES = {'I;16': 65535, 'I;16L': 65535, 'I;16B': 65535, 'I': 65535, 'F': 1.0}  # 16-bit (PIL reads 'I' too), float


def rgb_image(image):
    """A PIL image or an (H, W, 3) uint8 array -> an 8-bit RGB PIL image as it is shown: its EXIF
    orientation applied, converted exactly (RGB_READS; 16-bit or float greyscale scaled from its full
    range, 0..65535 or 0..1, to 0..255). ValueError in one line for a mode, or values, it cannot
    convert so."""
    if isinstance(image, np.ndarray):
        if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
            raise ValueError(f'an image array must be (H, W, 3) uint8 RGB, not {image.dtype} {image.shape}')
        return Image.fromarray(image)
    image = ImageOps.exif_transpose(image)
    if image.mode in GREY_RANGES:
        a, top = np.asarray(image, np.float64), GREY_RANGES[image.mode]
        if a.size and not (0 <= a.min() and a.max() <= top):  # (NaN fails too)
            raise ValueError(f'an image of PIL mode {image.mode} with values {a.min():g}..{a.max():g}, beyond '
                             f'0..{top:g}: convert it to 8-bit RGB')
        return Image.fromarray(np.repeat(np.round(a / top * 255).astype(np.uint8)[..., None], 3, -1))
    if image.mode not in RGB_READS:
        raise ValueError(f'an image of PIL mode {image.mode}, which does not convert to RGB exactly: convert it to '
                         '8-bit RGB')
    return image.convert('RGB')


def class_ids(logits, size):
    """argmax over the classes of logits (1, C, h, w) resized to size (bilinear) -> int32 (1, H, W), one
    class at a time: the memory of a few (H, W) maps, not of C of them (40 x 48 megapixels: 7.7 GB).
    Ties go to the first class, as argmax."""
    score = lambda c: F.interpolate(logits[:, c:c + 1], size=size, mode='bilinear', align_corners=False)[:, 0]  # noqa: E731
    best, ids = score(0), torch.zeros((1, *size), dtype=torch.int32, device=logits.device)
    for c in range(1, logits.shape[1]):
        s = score(c)  # (1, H, W)
        better = s > best
        best, ids = torch.where(better, s, best), ids.masked_fill_(better, c)
    return ids


def denormalise(x):
    """The inverse of normalise: (..., 3, H, W) -> RGB 0-255 float32, rounded and clamped."""
    mean, std = (torch.tensor(v, device=x.device).view(3, 1, 1) for v in (IMAGENET_MEAN, IMAGENET_STD))
    return ((x * std + mean) * 255).round().clamp(0, 255)


# ---- ImageNet-pretrained ViT checkpoints as people have them (timm / hub .pth .bin .safetensors, .npz) -----
def _read_npz(path, depth):
    """Google's original ViT .npz (big_vision / vit_jax names) -> timm's names and layouts."""
    w = np.load(path)
    t = lambda k: torch.from_numpy(np.asarray(w[k]))  # noqa: E731
    sd = {'patch_embed.proj.weight': t('embedding/kernel').permute(3, 2, 0, 1),  # HWIO -> OIHW
          'patch_embed.proj.bias': t('embedding/bias'),
          'cls_token': t('cls'),
          'pos_embed': t('Transformer/posembed_input/pos_embedding'),
          'norm.weight': t('Transformer/encoder_norm/scale'),
          'norm.bias': t('Transformer/encoder_norm/bias')}
    for i in range(depth):
        p, q = f'Transformer/encoderblock_{i}/', f'blocks.{i}.'
        att = p + 'MultiHeadDotProductAttention_1/'
        sd[q + 'norm1.weight'], sd[q + 'norm1.bias'] = t(p + 'LayerNorm_0/scale'), t(p + 'LayerNorm_0/bias')
        sd[q + 'norm2.weight'], sd[q + 'norm2.bias'] = t(p + 'LayerNorm_2/scale'), t(p + 'LayerNorm_2/bias')
        # q, k, v kernels are (C, heads, head_dim): flatten to (C, C), transpose to (out, in), stack
        sd[q + 'attn.qkv.weight'] = torch.cat([t(att + n + '/kernel').flatten(1).T for n in ('query', 'key', 'value')])
        sd[q + 'attn.qkv.bias'] = torch.cat([t(att + n + '/bias').flatten() for n in ('query', 'key', 'value')])
        sd[q + 'attn.proj.weight'] = t(att + 'out/kernel').flatten(0, 1).T
        sd[q + 'attn.proj.bias'] = t(att + 'out/bias')
        for j in (0, 1):
            sd[q + f'mlp.fc{j + 1}.weight'] = t(p + f'MlpBlock_3/Dense_{j}/kernel').T
            sd[q + f'mlp.fc{j + 1}.bias'] = t(p + f'MlpBlock_3/Dense_{j}/bias')
    return sd


HUB_ID = re.compile(r'[\w-][\w.-]*(/[\w-][\w.-]*)?')  # a hub repository: owner/name, or a bare timm name
WEIGHT_FILES = ('.pth', '.pt', '.bin', '.safetensors', '.npz')
# The ImageNet checkpoint the authors' code starts from, as a hub id: timm's vit_<size>_patch16_384 with
# pretrained=True (TaskPrompter utils/common_config.py get_backbone), the AugReg ImageNet-21k -> 1k weights
IMAGENET_WEIGHTS = 'vit_{}_patch16_384.augreg_in21k_ft_in1k'  # .format(backbone size)


def pretrained_file(name):
    """An ImageNet checkpoint as train.py's --pretrained names it -> a local file: the path itself, else
    the model.safetensors of that Hugging Face hub repository (a bare timm name is timm/<name>), fetched
    once with a progress bar into torch's hub cache (<TORCH_HOME>/hub/checkpoints). HF_ENDPOINT may name
    a mirror of the hub. FileNotFoundError in one line, with how to fetch it by hand, when it cannot be."""
    if os.path.isfile(name):
        return name
    if name.endswith(WEIGHT_FILES) or not HUB_ID.fullmatch(name):
        raise FileNotFoundError(f'{name}: file not found')
    repo, endpoint = name if '/' in name else f'timm/{name}', os.environ.get('HF_ENDPOINT', 'https://huggingface.co')
    url = f'{endpoint.rstrip("/")}/{repo}/resolve/main/model.safetensors'
    path = os.path.join(torch.hub.get_dir(), 'checkpoints', repo.replace('/', '--') + '.safetensors')
    if not os.path.isfile(path):
        if not re.fullmatch(r'https?://[^/\s]+(/\S*)?', endpoint):
            raise FileNotFoundError(f'{name}: HF_ENDPOINT={endpoint!r} is not a URL of the hub or a mirror (e.g. '
                                    'https://huggingface.co): correct it, or unset it')
        try:  # into a temporary file beside it, renamed once complete: a broken download leaves nothing
            os.makedirs(os.path.dirname(path), exist_ok=True)
            torch.hub.download_url_to_file(url, path)
        except Exception as e:  # offline, blocked, no such repository: one remedy for all
            why = str(e).strip().partition('\n')[0]
            file = repo.split('/')[1] + '.safetensors'
            raise FileNotFoundError(f'{name}: cannot fetch {url} ({type(e).__name__}: {why}); fetch it by hand with '
                                    f'`curl -L -o {file} {url}` and pass --pretrained {file}') from None
    return path


def load_pretrained(model, name):
    """An ImageNet ViT checkpoint (a file or a hub id, see pretrained_file) into model.backbone, strictly:
    a timm state dict (.pth/.pt/.bin, maybe wrapped in {'model': ...} or {'state_dict': ...}, keys maybe
    prefixed 'module.' or '_orig_mod.'), a .safetensors file or Google's .npz. The classifier ('head.*',
    'fc_norm.*') is dropped; pos_embed is resampled to the training grid; every other key must match
    in name and shape."""
    path = pretrained_file(name)
    vit = model.backbone
    if path.endswith('.safetensors'):
        sd = safetensors.torch.load_file(path)
    elif path.endswith('.npz'):
        sd = _read_npz(path, len(vit.blocks))
    else:
        sd = torch.load(path, map_location='cpu', weights_only=True)
        for wrapper in ('model', 'state_dict'):
            if isinstance(sd, dict) and isinstance(sd.get(wrapper), dict):
                sd = sd[wrapper]
    plain = {re.sub(r'^(module\.|_orig_mod\.)+', '', k): v for k, v in sd.items()}  # DDP, compile: any order
    if any(k.startswith(('mmoe.', 'heads.')) for k in plain):
        raise ValueError(f'{path}: a TaskExpert trained by train.py, not ImageNet weights of a ViT: continue it with '
                         '--resume, or evaluate it or predict with --checkpoint')
    clean = {k: v for k, v in plain.items() if not k.startswith(('head.', 'fc_norm.'))}  # not the classifier
    own = vit.state_dict()
    missing, unexpected = sorted(own.keys() - clean.keys()), sorted(clean.keys() - own.keys())
    if missing or unexpected:
        raise KeyError(f'{path}: checkpoint does not match ViT-{len(vit.blocks)}x{own["norm.weight"].numel()}: '
                       f'missing {missing[:5]}, unexpected {unexpected[:5]}')
    clean['pos_embed'] = resample_pos_embed(clean['pos_embed'], vit.grid)
    for k, v in clean.items():
        if v.shape != own[k].shape:
            raise ValueError(f'{path}: {k} has shape {tuple(v.shape)}, the model expects {tuple(own[k].shape)}')
    vit.load_state_dict(clean, strict=True)

# ---- Trained models' files, as train.py writes them --------------------------------------------------------
# (atomically; tensors and plain data, weights_only=True):
#   .pt               the full training state: 'model', 'optimizer', 'scaler', 'step', 'rng' (one RNG state
#                     per process), 'config' (train.py's settings), 'best' (in best.pt: its record), 'format'
#   best.safetensors  the model to share: its weights alone; 'config', 'step', 'metrics' (its evaluation),
#                     'selection' (how it was chosen) and 'format' as JSON strings in its metadata

CHECKPOINT_FORMAT = 2  # 2: the last MMoE reads the final LayerNorm's output (format 1, unmarked: it did not)


def atomic_write(path, write):
    """write(file) into a temporary file beside `path`, fsync, then rename over `path`: a crash at any
    moment leaves either the old file or the new one, never a torn one."""
    folder = os.path.dirname(os.path.abspath(path))
    tmp = os.path.join(folder, f'.{os.path.basename(path)}.tmp{os.getpid()}')
    try:
        with open(tmp, 'wb') as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except RuntimeError as e:  # torch.save reports a failed write (a full disk) as RuntimeError, not OSError
        why = str(e).strip().partition('\n')[0]
        raise OSError(errno.EIO, f'cannot write it, the disk may be full ({why})', path) from None
    except OSError as e:  # (named by the file it was to be, not its temporary one)
        raise OSError(e.errno, e.strerror or str(e), path) from None
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    with contextlib.suppress(OSError):  # make the rename itself durable (not possible everywhere)
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def remove_temporaries(folder):
    """Delete the temporary files of atomic_write calls that a kill interrupted (.<name>.tmp<pid>), in a
    folder that no other process is writing into."""
    for name in [n for n in os.listdir(folder) if re.fullmatch(r'\..+\.tmp\d+', n)]:
        os.remove(os.path.join(folder, name))


def save_checkpoint(path, *, model, optimizer, scaler, step, rng, config, best=None):
    """The full training state of `step` as a .pt file (see above), to resume from."""
    ckpt = {'model': model.state_dict(), 'optimizer': optimizer.state_dict(), 'scaler': scaler.state_dict(),
            'step': step, 'rng': rng, 'config': config, 'best': best, 'format': CHECKPOINT_FORMAT}
    atomic_write(path, lambda f: torch.save(ckpt, f))


def save_weights(path, model, step, config, metrics, selection):
    """The model to share as .safetensors: its weights alone, with the settings, the training step, the
    metrics of its evaluation and a sentence on how it was selected as JSON strings in the metadata."""
    meta = {k: json.dumps(v) for k, v in (('config', config), ('step', step), ('metrics', metrics),
                                          ('selection', selection), ('format', CHECKPOINT_FORMAT))}
    blob = safetensors.torch.save(model.state_dict(), meta)
    atomic_write(path, lambda f: f.write(blob))


def read_checkpoint(path, mmap=False):
    """A trained model's file (.pt or .safetensors, see above) -> dict with at least 'model' (state
    dict), 'config' and 'step'. mmap (.pt): tensors stay in the file until used, to read the plain
    data of a large checkpoint. Raises FileNotFoundError / ValueError with a one-line message."""
    if os.path.isdir(path):
        raise FileNotFoundError(f'{path}: a folder, not a checkpoint: pass one of its files, e.g. '
                                f'{os.path.join(path, "best.pt")} (last.pt to resume)')
    if not os.path.isfile(path):
        raise FileNotFoundError(f'checkpoint {path} not found')
    try:
        if path.endswith('.safetensors'):
            with safetensors.safe_open(path, framework='pt') as f:
                meta = f.metadata() or {}
                ckpt = {'model': {k: f.get_tensor(k) for k in f.keys()},
                        **{k: json.loads(meta[k]) for k in ('config', 'step', 'metrics', 'selection', 'format') if k in meta}}
        else:
            ckpt = torch.load(path, map_location='cpu', weights_only=True, mmap=mmap)
    except Exception as e:  # torn, truncated or foreign file
        why = str(e).strip().partition('\n')[0].split('. ')[0]
        raise ValueError(f'checkpoint {path} cannot be read ({type(e).__name__}: {why})') from None
    if not isinstance(ckpt, dict) or not {'model', 'config', 'step'} <= ckpt.keys():
        raise ValueError(f'{path} is not a model trained by train.py (no model/config/step); '
                         'ImageNet backbone weights go to train.py --pretrained')
    if ckpt.get('format', 1) != CHECKPOINT_FORMAT:
        raise ValueError(f'{path}: written by an older train.py (its model read the last tap without the final '
                         'LayerNorm), which this version does not read')
    return ckpt


def load_weights(model, state_dict, path):
    """A checkpoint's weights into the model built from its config, strictly; ValueError in one line
    naming `path` when they disagree (a config edited by hand, or the weights of another model), or
    when they are not finite (a diverged run's)."""
    bad = [k for k, v in state_dict.items() if v.is_floating_point() and not v.isfinite().all()]
    if bad:
        raise ValueError(f'{path}: the run that saved it diverged: {len(bad)} of its tensors hold NaN or inf (e.g. '
                         f'{bad[0]}); use an earlier checkpoint of the run')
    try:
        model.load_state_dict(state_dict)
    except RuntimeError as e:  # its message lists every missing, unexpected or misshapen key, a line each
        raise ValueError(f'{path}: its weights do not fit its config ({str(e).splitlines()[-1].strip()[:200]}); '
                         'restore the checkpoint as train.py wrote it') from None
