"""TaskExpert in one file: ViT backbone, Memorial Mixture-of-Experts (MMoE) with the multi-task
feature memory, task heads, losses and metrics.

Paper: Hanrong Ye, Dan Xu, "TaskExpert: Dynamically Assembling Multi-Task Representations with
Memorial Mixture-of-Experts", ICCV 2023 (arXiv 2307.15324). The authors never released code; this is
an independent reading of the paper. What the paper states (abstract, Fig. 2): expert networks
decompose a backbone feature into task-generic features; one gating network per task assembles them
per sample; MMoE modules sit at several backbone layers; a multi-task feature memory is read as one
extra expert and written at each MMoE layer; the memory after the last MMoE feeds the final
prediction of each task. Everything else below is our reconstruction, exposed as named options of
`TaskExpert` with the default we chose, and commented where it is made.

Notation (as in the paper): X_l tokens after backbone block l, (B, N, C) with N = (H/16)(W/16);
T tasks; E experts; D expert width; Z_e expert features; g_t gate of task t; M_t memory of task t.
"""
import base64
import collections
import concurrent.futures
import json
import math
import multiprocessing
import os
import re
import time
import zlib

import numpy as np
import scipy.ndimage as ndi
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image
from scipy.sparse import csr_array
from scipy.sparse.csgraph import maximum_flow
from torch.utils.checkpoint import checkpoint
from torch.utils.flop_counter import FlopCounterMode

# Output channels of each task's head, per dataset (the synthetic scenes use the NYUD layout).
TASKS = {
    'nyud': {'semseg': 40, 'depth': 1, 'normals': 3, 'edge': 1},
    'pascal': {'semseg': 21, 'human_parts': 7, 'sal': 1, 'normals': 3, 'edge': 1},
}
TASK_SET = {'nyud': 'nyud', 'pascal': 'pascal', 'synthetic': 'nyud'}  # train.py's --dataset -> key of TASKS

# -------------------------------------------------------------------------------------------------
# ViT backbone (Dosovitskiy et al.), parameter names and arithmetic as timm's VisionTransformer, so
# ImageNet checkpoints of vit_{tiny,small,base,large}_patch16_384 load strictly.
# -------------------------------------------------------------------------------------------------

# preset -> (embed dim C, depth, heads, MMoE taps (1-based blocks), expert width D, drop-path)
VIT_PRESETS = {
    'tiny': dict(embed_dim=192, depth=12, num_heads=3, taps=(3, 6, 9, 12), expert_dim=256, drop_path=0.0),
    'small': dict(embed_dim=384, depth=12, num_heads=6, taps=(3, 6, 9, 12), expert_dim=256, drop_path=0.0),
    'base': dict(embed_dim=768, depth=12, num_heads=12, taps=(3, 6, 9, 12), expert_dim=512, drop_path=0.15),
    'large': dict(embed_dim=1024, depth=24, num_heads=16, taps=(6, 12, 18, 24), expert_dim=768, drop_path=0.15),
}
PATCH = 16


def drop_path(x, p, training):
    """Stochastic depth: drop the whole residual branch per sample with probability p."""
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
        self.act = nn.GELU()  # exact (erf) GELU: the tanh form differs and CoreML silently swaps it
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


def resample_pos_embed(pos_embed, grid, old_grid=None):
    """Bicubic resampling of a learned position embedding (1, 1 + h0*w0, C) to grid (h, w), in fp32.

    The class-token slot is kept as is. Without old_grid, a checkpoint's grid is taken to be square
    (e.g. 24x24 for a 384 model -> 28x36 for NYUD's 448x576) or, if it has h*w patches, (h, w). antialias as timm does, which matters
    only when shrinking.
    """
    cls_pos, patch_pos = pos_embed[:, :1], pos_embed[:, 1:]
    if old_grid is None and patch_pos.shape[1] == grid[0] * grid[1]:
        return pos_embed  # saved at this grid already (e.g. our own fine-tuned backbone)
    if old_grid is None:
        side = math.isqrt(patch_pos.shape[1])
        if side * side != patch_pos.shape[1]:
            raise ValueError(f'position embedding with {patch_pos.shape[1]} patches is not a square grid')
        old_grid = (side, side)
    if tuple(old_grid) == tuple(grid):
        return pos_embed
    C = pos_embed.shape[-1]
    patch_pos = patch_pos.float().reshape(1, *old_grid, C).permute(0, 3, 1, 2)  # (1, C, h0, w0)
    patch_pos = F.interpolate(patch_pos, size=tuple(grid), mode='bicubic', align_corners=False, antialias=True)
    patch_pos = patch_pos.permute(0, 2, 3, 1).reshape(1, grid[0] * grid[1], C).to(pos_embed.dtype)
    return torch.cat([cls_pos, patch_pos], dim=1)


def sincos_pos_embed(grid, dim):
    """Fixed 2-D position codes (h*w, dim): sin and cos of the row, then of the column, each at dim/4
    geometric frequencies 1 ... 1/10000 (the Transformer's sinusoidal code, once per axis)."""
    omega = 1.0 / 10000 ** (torch.arange(dim // 4) / (dim // 4))  # (dim/4,)
    rows, cols = torch.meshgrid(torch.arange(grid[0]), torch.arange(grid[1]), indexing='ij')
    angles = [a.reshape(-1, 1).float() * omega for a in (rows, cols)]  # 2 x (h*w, dim/4)
    return torch.cat([f(a) for a in angles for f in (torch.sin, torch.cos)], dim=1)


class VisionTransformer(nn.Module):
    """ViT-{tiny,small,base,large}/16 with class token and learned absolute position embedding.

    The position embedding lives at the training grid (img_size / 16): a checkpoint's 24x24 grid is
    resampled once, at load (`load_pretrained`), not in every forward pass.
    """

    def __init__(self, embed_dim, depth, num_heads, img_size, drop_path=0.0):
        super().__init__()
        self.grid = (img_size[0] // PATCH, img_size[1] // PATCH)
        self.patch_embed = PatchEmbed(embed_dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + self.grid[0] * self.grid[1], embed_dim))
        # stochastic depth grows linearly with depth, as in timm / DeiT
        self.blocks = nn.ModuleList(Block(embed_dim, num_heads, p) for p in np.linspace(0, drop_path, depth).tolist())
        self.norm = nn.LayerNorm(embed_dim, eps=1e-6)
        # From scratch, a 2-D sine-cosine start (as MAE / MoCo v3) gives every token its row and
        # column from the first step instead of timm's N(0, 0.02); pretrained weights replace it.
        # Depth leans on position (the floor's depth follows the image row; README, 'Results').
        with torch.no_grad():
            self.pos_embed[0, 1:] = sincos_pos_embed(self.grid, embed_dim)
        nn.init.normal_(self.cls_token, std=1e-6)
        self.apply(_init_vit_weights)

    def set_grid(self, grid):
        """Resample the position embedding in place to a new token grid (h, w)."""
        with torch.no_grad():
            self.pos_embed = nn.Parameter(resample_pos_embed(self.pos_embed.data, grid, self.grid))
        self.grid = tuple(grid)

    def forward_features(self, x, taps, recompute=False):
        """(B, 3, H, W) -> [X_l for l in taps], each (B, N, C) without the class token. The blocks
        after the last tap are not run: nothing reads them. recompute: activation checkpointing,
        each block keeps only its input for backward and runs again there."""
        grid = (x.shape[-2] // PATCH, x.shape[-1] // PATCH)
        x = self.patch_embed(x)  # (B, N, C)
        pos = self.pos_embed
        if grid != self.grid:  # an input size other than the training size: resample for this call
            pos = resample_pos_embed(pos, grid, self.grid)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + pos  # (B, 1 + N, C)
        tapped = []
        for i, blk in enumerate(self.blocks[:max(taps)]):
            # (drop-path masks are drawn again in the recomputation from the same saved RNG state)
            x = checkpoint(blk, x, use_reentrant=False) if recompute else blk(x)
            if i + 1 in taps:
                tapped.append(x[:, 1:])
        return tapped


def _init_vit_weights(m):
    if isinstance(m, nn.Linear):
        nn.init.trunc_normal_(m.weight, std=0.02)
        nn.init.zeros_(m.bias)


# -------------------------------------------------------------------------------------------------
# Memorial Mixture-of-Experts (paper Sec. 3, Fig. 2)
# -------------------------------------------------------------------------------------------------

class MMoE(nn.Module):
    """One MMoE module at backbone block l. [paper] = stated in the paper (abstract, Fig. 2);
    [ours] = our reconstruction where it is silent.

    Experts (shared by all tasks) decompose X_l into E task-generic features          [paper]
        Z_e = GELU(LN_e(W_e X_l)),                                  each (B, N, D)     [ours]
    and a gate per task mixes them, per sample, with the task's memory M_t as an extra expert [paper]
        g_t = softmax(W_t [X_l ; mean_N(X_l)] + b_t)                 over E (+1)       [ours]
        F_t = sum_e g_t,e Z_e + g_t,E+1 M_t                          (B, N, D)         [paper]
    after which the memory is written at this MMoE                                     [paper]
        M_t <- F_t ('replace', default) or M_t + F_t ('add')                           [ours]
    At the first MMoE the memory is still empty: its gates weigh the E experts only.  [ours]

    Our choices in detail: experts are Linear -> LayerNorm -> GELU; the gate sees each token
    together with the image mean (its context); it is softmaxed per token by default or, with
    gate='image', once per image from the mean of the token logits. gate='static' (ablation
    baseline, first MMoE only) has no gates: every task reads the same fixed mean of the experts.
    """

    def __init__(self, tasks, in_dim, num_experts, expert_dim, first, gate, memory_write):
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
        """h = W_e X_l (B, N, E, D) -> Z_e = GELU(LN_e(h)) (B, N, E, D), in h's dtype. Under CUDA
        autocast LayerNorm runs in fp32; the result is cast back once, so the T gated sums below
        share one low-precision copy instead of each casting (and saving) its own."""
        z = F.layer_norm(h, (self.D,), eps=1e-6) * self.expert_norm_weight + self.expert_norm_bias
        return F.gelu(z).to(h.dtype)

    def forward(self, x, memory):
        """x: X_l (B, N, C); memory: dict task -> M_t (B, N, D), or None at the first MMoE.
        Returns (new memory dict task -> (B, N, D), gate weights dict task -> (B, N, E or E+1);
        empty for gate='static')."""
        B, N, _ = x.shape
        h = self.experts(x).reshape(B, N, self.E, self.D)  # in the autocast dtype, if any
        if self.training and torch.is_grad_enabled():
            # keep only h for backward and recompute LN + GELU there (elementwise, ~free): otherwise
            # their fp32 inputs and outputs under autocast are saved, 3 copies of (B, N, E, D) in fp32
            z = checkpoint(self.expert_features, h, use_reentrant=False)
        else:
            z = self.expert_features(h)  # (B, N, E, D) = the E task-generic features Z_e
        if self.gate_mode == 'static':  # one feature shared by all tasks: g_t,e = 1/E, fixed
            f = z.mean(dim=2)  # (B, N, D)
            return {t: f for t in self.tasks}, {}
        # (B, N, 2C), cast once to the dtype the gates compute in (autocast would cast it per task)
        context = torch.cat([x, x.mean(dim=1, keepdim=True).expand(-1, N, -1)], dim=-1).to(h.dtype)
        new_memory, weights = {}, {}
        for t, gate in self.gates.items():
            logits = gate(context).float()  # (B, N, E[+1]); softmax in fp32 also under autocast
            if self.gate_mode == 'image':
                logits = logits.mean(dim=1, keepdim=True)  # (B, 1, E[+1]): one mixture per image
            g = logits.softmax(dim=-1).to(z.dtype).expand(B, N, -1)
            if self.first:
                f = torch.einsum('bne,bned->bnd', g, z)  # read the experts
            else:  # read the experts and the memory as the (E+1)-th expert
                f = torch.einsum('bne,bned->bnd', g[..., :self.E], z) + g[..., self.E:] * memory[t]
                if self.memory_write == 'add':
                    f = f + memory[t]
            new_memory[t], weights[t] = f, g.detach()
        return new_memory, weights


class TaskHead(nn.Module):
    """Per-task decoder on the final memory (input: [paper]; design: [ours], the paper gives no details):
    (B, N, D) -> (B, D, H/16, W/16) -> bilinear x4 -> Conv3x3+BN+GELU -> Conv1x1 -> bilinear to (H, W)."""

    def __init__(self, dim, out_channels):
        super().__init__()
        self.conv = nn.Conv2d(dim, dim, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(dim)
        self.pred = nn.Conv2d(dim, out_channels, 1)

    def forward(self, m, grid, size):
        x = m.transpose(1, 2).reshape(m.shape[0], -1, *grid)  # (B, D, H/16, W/16)
        x = F.interpolate(x, scale_factor=4, mode='bilinear', align_corners=False)
        x = self.pred(F.gelu(self.bn(self.conv(x))))  # (B, out, H/4, W/4)
        return F.interpolate(x, size=size, mode='bilinear', align_corners=False)  # (B, out, H, W)


ABLATIONS = ('none', 'no-memory', 'static')  # TaskExpert(ablation=...): the parts removed


class TaskExpert(nn.Module):
    """ViT backbone + MMoE at the tapped blocks + one head per task on the final memory.

    tasks: dict task -> output channels (see TASKS). Options (defaults = our reading of the paper;
    [paper] / [ours] as in MMoE):
      backbone      'tiny' | 'small' | 'base' | 'large' ([paper]: large on NYUD, base on PASCAL)
      img_size      training size (H, W), divisible by 16; sets the position-embedding grid
      num_experts   E, the shared experts per MMoE ([ours]: 8)
      expert_dim    D, the expert width ([ours]: 256 tiny/small, 512 base, 768 large)
      taps          1-based backbone blocks carrying an MMoE ([paper]: several; [ours]: 4 evenly
                    spaced, the last one included)
      gate          'token' (a mixture per token) | 'image' (one mixture per image)
      memory_write  'replace' (M_t <- F_t) | 'add' (M_t <- M_t + F_t)
      drop_path     stochastic depth of the backbone (default 0.15 for base/large, 0 for tiny/small)
      grad_checkpoint  activation checkpointing while training, less memory for more compute, same
                    numbers: 'off', 'mmoe' (the MMoE modules: +1 % FLOPs) or 'all' (also the backbone
                    blocks: one more backbone forward, +17 % for ViT-L). Never the heads: their
                    BatchNorm would update its running statistics twice.
      ablation      what to remove, to measure what each part buys (README, Ablation):
                    'none'       the full model;
                    'no-memory'  no memory: one MMoE, at the last tap, gates over its E experts and
                                 the heads read its output (without the memory nothing carries an
                                 earlier MMoE's output to the heads, so earlier MMoEs are not built);
                    'static'     no memory and no gates: the same experts at the last tap, averaged
                                 with fixed weights 1/E into one feature that every head reads. It
                                 differs from 'no-memory' only by the gates (same experts, same
                                 width), so the pair measures dynamic per-task assembly and nothing
                                 else; a single narrower projection would mix in a loss of capacity.
    After a forward pass, `self.gates` holds one dict per tap: task -> gate weights (B, N, E[+1]);
    with ablation='static' the one dict is empty.
    Bad options raise ValueError('<option> <value>: what is wrong'); the scripts turn the option into
    their flag (img_size -> --img-size) for their one-line error, so each rule lives here only.
    """

    def __init__(self, tasks, backbone='large', img_size=(448, 576), num_experts=8, expert_dim=None,
                 taps=None, gate='token', memory_write='replace', drop_path=None, grad_checkpoint='off',
                 ablation='none'):
        super().__init__()
        if backbone not in VIT_PRESETS:
            raise ValueError(f'unknown backbone {backbone!r}: choose one of {", ".join(VIT_PRESETS)}')
        if min(img_size) <= 0 or img_size[0] % PATCH or img_size[1] % PATCH:
            raise ValueError(f'img_size {img_size[0]} {img_size[1]}: both must be positive and divisible by {PATCH}')
        if gate not in ('token', 'image') or memory_write not in ('replace', 'add'):
            raise ValueError(f'gate must be token|image and memory_write replace|add, got {gate!r}, {memory_write!r}')
        if grad_checkpoint not in ('off', 'mmoe', 'all'):
            raise ValueError(f'grad_checkpoint must be off|mmoe|all, got {grad_checkpoint!r}')
        if ablation not in ABLATIONS:
            raise ValueError(f'ablation {ablation}: must be one of {", ".join(ABLATIONS)}')
        p = VIT_PRESETS[backbone]
        self.tasks = dict(tasks)
        self.taps = tuple(p['taps'] if taps is None else taps)
        if not self.taps or any(not 1 <= l <= p['depth'] for l in self.taps) or list(self.taps) != sorted(set(self.taps)):
            raise ValueError(f'taps {" ".join(map(str, self.taps))}: must be increasing blocks in 1..{p["depth"]} '
                             f'for the {backbone} backbone')
        self.ablation = ablation
        if ablation != 'none':  # one MMoE, at the last tap: it is the first, so it has no memory slot
            self.taps = self.taps[-1:]
        expert_dim = expert_dim or p['expert_dim']
        for name, v in (('num_experts', num_experts), ('expert_dim', expert_dim)):
            if v < 1:
                raise ValueError(f'{name} {v}: must be at least 1')
        self.backbone = VisionTransformer(p['embed_dim'], p['depth'], p['num_heads'], img_size,
                                          p['drop_path'] if drop_path is None else drop_path)
        self.mmoe = nn.ModuleList(
            MMoE(self.tasks, p['embed_dim'], num_experts, expert_dim, i == 0,
                 'static' if ablation == 'static' else gate, memory_write)
            for i in range(len(self.taps)))
        self.heads = nn.ModuleDict({t: TaskHead(expert_dim, c) for t, c in self.tasks.items()})
        # The final LayerNorm is only there so timm checkpoints load strictly: the MMoEs read the
        # un-normed block outputs. Blocks after the last tap feed nothing either: they are not run.
        # Neither gets a gradient, so both are frozen (DDP fails on trainable parameters without
        # one) and kept, so that ImageNet checkpoints still load strictly.
        self.backbone.norm.requires_grad_(False)
        self.backbone.blocks[self.taps[-1]:].requires_grad_(False)
        self.grad_checkpoint = grad_checkpoint
        self.gates = []

    def forward(self, x):
        """x (B, 3, H, W) ImageNet-normalised -> dict task -> raw prediction (B, C_t, H, W)."""
        grid = (x.shape[-2] // PATCH, x.shape[-1] // PATCH)
        recompute = self.grad_checkpoint if self.training and torch.is_grad_enabled() else 'off'
        tapped = self.backbone.forward_features(x, self.taps, recompute=recompute == 'all')
        memory, self.gates = None, []
        for mmoe, x_l in zip(self.mmoe, tapped):
            if recompute == 'off':
                memory, g = mmoe(x_l, memory)
            else:  # keep X_l and the memory for backward, run the MMoE again there
                memory, g = checkpoint(mmoe, x_l, memory, use_reentrant=False)
            self.gates.append(g)
        # the memory after the last MMoE feeds every task's final prediction (paper Fig. 2)
        return {t: head(memory[t], grid, x.shape[-2:]) for t, head in self.heads.items()}

    @classmethod
    def from_config(cls, config):
        """An untrained model from train.py's settings (its config.json, or the 'config' saved with a
        trained model): the dataset's tasks and the model keys; the other settings are ignored."""
        return cls(TASKS[TASK_SET[config['dataset']]], backbone=config['backbone'],
                   img_size=tuple(config['img_size']), num_experts=config['num_experts'],
                   expert_dim=config['expert_dim'], taps=tuple(config['taps']), gate=config['gate'],
                   memory_write=config['memory_write'],
                   ablation=config.get('ablation', 'none'))  # saved before ablations existed: the full model

    @classmethod
    def from_checkpoint(cls, path):
        """A trained model from train.py's best.safetensors (weights only) or a .pt checkpoint, on the
        CPU in eval mode; its settings and training step as model.config and model.step. Raises
        FileNotFoundError / ValueError with a one-line message (see read_checkpoint)."""
        ckpt = read_checkpoint(path)
        model = cls.from_config(ckpt['config'])
        try:
            model.load_state_dict(ckpt['model'])
        except RuntimeError as e:  # torch lists every key on its own line
            raise ValueError(f'{path}: the weights do not fit its config ({str(e).splitlines()[0]})') from None
        model.config, model.step = ckpt['config'], ckpt['step']
        return model.eval()


def count_train_flops(model):
    """-> (forward, forward + backward) FLOPs of one training image at the model's training size,
    as torch.utils.flop_counter counts them: matrix products, convolutions and attention (the
    elementwise ops and the loss are left out, as is usual for MFU). With grad_checkpoint on, the
    recomputation counts too; MFU counts the model's FLOPs, without it. Build the model on the meta
    device (`with torch.device('meta'):`) to count ViT-L on any CPU at once."""
    H, W = (g * PATCH for g in model.backbone.grid)
    x = torch.zeros(1, 3, H, W, device=model.backbone.pos_embed.device)
    with FlopCounterMode(display=False) as counter:
        outputs = model.train()(x)
        forward = counter.get_total_flops()
        # the loss's gradient reaches every output, as this sum's does: same backward FLOPs
        sum(o.float().sum() for o in outputs.values()).backward()
    return forward, counter.get_total_flops()


# -------------------------------------------------------------------------------------------------
# ImageNet-pretrained ViT checkpoints as people have them (timm / hub .pth .bin .safetensors, .npz)
# -------------------------------------------------------------------------------------------------

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


def pretrained_file(name):
    """An ImageNet checkpoint as train.py's --pretrained names it -> a local file: the path itself, else
    the model.safetensors of that Hugging Face hub repository (a bare timm name such as
    vit_large_patch16_384.augreg_in21k_ft_in1k is timm/<name>), fetched once into the hub's cache by
    huggingface_hub, an optional dependency. Raises FileNotFoundError, in one line that says how to
    fetch the file by hand when the package is missing or the hub out of reach."""
    if os.path.isfile(name):
        return name
    if name.endswith(WEIGHT_FILES) or not HUB_ID.fullmatch(name):
        raise FileNotFoundError(f'{name}: file not found')
    repo = name if '/' in name else f'timm/{name}'
    file = repo.split('/')[1] + '.safetensors'
    by_hand = (f'download it with `curl -L -o {file} https://huggingface.co/{repo}/resolve/main/model.safetensors` '
               f'and pass --pretrained {file}')
    try:
        from huggingface_hub import hf_hub_download
    except ImportError:
        raise FileNotFoundError(f'{name}: not a file; to fetch {repo} from the Hugging Face hub `pip install '
                                f'huggingface_hub`, or {by_hand}') from None
    try:
        return hf_hub_download(repo_id=repo, filename='model.safetensors')
    except Exception as e:  # offline, no such repository, no model.safetensors there: one remedy for all
        why = str(e).strip().partition('\n')[0]
        raise FileNotFoundError(f'{name}: cannot fetch model.safetensors of {repo} from the Hugging Face hub '
                                f'({type(e).__name__}: {why}); {by_hand}') from None


def load_pretrained(model, name):
    """Load an ImageNet ViT checkpoint (a file or a hub id, see pretrained_file) into model.backbone,
    strictly.

    Accepts a timm state dict (.pth/.pt/.bin, possibly wrapped in {'model': ...} or {'state_dict':
    ...}, keys possibly prefixed 'module.' or '_orig_mod.'), a .safetensors file, or Google's .npz.
    The classifier ('head.*', 'fc_norm.*') is dropped; every other key must match in name and
    shape, except pos_embed, which is resampled (bicubic, fp32) to the model's training grid.
    """
    path = pretrained_file(name)
    vit = model.backbone
    if path.endswith('.safetensors'):
        from safetensors.torch import load_file
        sd = load_file(path)
    elif path.endswith('.npz'):
        sd = _read_npz(path, len(vit.blocks))
    else:
        sd = torch.load(path, map_location='cpu', weights_only=True)
        for wrapper in ('model', 'state_dict'):
            if isinstance(sd, dict) and isinstance(sd.get(wrapper), dict):
                sd = sd[wrapper]
    clean = {}
    for k, v in sd.items():
        for prefix in ('module.', '_orig_mod.'):
            k = k.removeprefix(prefix)
        if not k.startswith(('head.', 'fc_norm.')):
            clean[k] = v
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


# -------------------------------------------------------------------------------------------------
# Trained models: the files train.py writes, and predictions post-processed as apps want them
# (the one post-processing, shared by predict() and export.py's exported models)
# -------------------------------------------------------------------------------------------------

def read_checkpoint(path, mmap=False):
    """A trained model's file -> dict: 'model' (state dict), 'config' (train.py's settings), 'step'.
    train.py writes two kinds: .pt, the full training state (torch.load weights_only=True; also
    'optimizer', 'scaler', 'rng' and 'best', to resume), and best.safetensors, the weights alone with
    'config', 'step' and 'metrics' (its evaluation) as JSON strings in the file's metadata.
    mmap (.pt): tensors stay in the file until used, to read the plain data of a large checkpoint.
    Raises FileNotFoundError / ValueError with a one-line message."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f'checkpoint {path} not found')
    try:
        if path.endswith('.safetensors'):
            from safetensors import safe_open
            with safe_open(path, framework='pt') as f:
                meta = f.metadata() or {}
                ckpt = {'model': {k: f.get_tensor(k) for k in f.keys()},
                        **{k: json.loads(v) for k, v in meta.items() if k in ('config', 'step', 'metrics')}}
        else:
            ckpt = torch.load(path, map_location='cpu', weights_only=True, mmap=mmap)
    except Exception as e:  # torn, truncated or foreign file
        why = str(e).strip().partition('\n')[0]
        raise ValueError(f'checkpoint {path} cannot be read ({type(e).__name__}: {why})') from None
    if not isinstance(ckpt, dict) or not {'model', 'config', 'step'} <= ckpt.keys():
        raise ValueError(f'{path} is not a model trained by train.py (no model/config/step); '
                         'ImageNet backbone weights go to train.py --pretrained')
    return ckpt


CLASS_MAP_TASKS = ('semseg', 'human_parts')
NORMALS_EPS = 1e-4  # the smallest normal fp16 number is 6e-5: a raw normal shorter than this has no direction


def postprocess(raw, probabilities=False):
    """Raw head outputs (dict task -> (B, C_t, H, W)) -> dict output name -> what an app wants."""
    out = {}
    for task, x in raw.items():
        if task in CLASS_MAP_TASKS:
            out[task] = x.argmax(1).to(torch.int32)  # (B, H, W)
            if probabilities:
                out[task + '_prob'] = x.softmax(1)  # (B, C, H, W)
        elif task == 'normals':
            out[task] = F.normalize(x, dim=1, eps=NORMALS_EPS)  # (B, 3, H, W) unit vectors
        elif task in ('edge', 'sal'):
            out[task] = x.sigmoid()  # (B, 1, H, W) probabilities
        else:  # depth: the head already predicts metres
            out[task] = x
    return out


@torch.no_grad()
def predict(model, image, probabilities=False):
    """One RGB image of any size (a PIL image, or an (H, W, 3) uint8 array) -> the model's predictions
    at that size, post-processed: dict name -> numpy array, semseg / human_parts int32 (H, W) class
    ids (with probabilities=True also '<task>_prob' float32 (C, H, W)), depth float32 (1, H, W)
    metres, normals float32 (3, H, W) unit vectors, edge / sal float32 (1, H, W) probabilities.

    As in evaluation, the image is normalised and padded at the bottom / right to the network size
    (the training size, model.backbone.grid x 16); an image larger than that is first shrunk to fit
    (aspect kept, bilinear). The raw outputs of the content are resized (bilinear) to (H, W), then
    post-processed: memory grows with classes x H x W (~2 GB for NYUD's 40 at 12 megapixels).
    Runs on the model's device, in eval mode, under the caller's torch.autocast if any."""
    from data import to_tensors  # here: data.py imports this module
    if isinstance(image, np.ndarray):
        if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
            raise ValueError(f'predict: an image array must be (H, W, 3) uint8 RGB, not {image.dtype} {image.shape}')
        image = Image.fromarray(image)
    image = image.convert('RGB')
    H, W = model.backbone.grid[0] * PATCH, model.backbone.grid[1] * PATCH
    s = min(1.0, H / image.height, W / image.width)
    h, w = min(H, max(1, round(image.height * s))), min(W, max(1, round(image.width * s)))
    fitted = image if s == 1 else image.resize((w, h), Image.BILINEAR)
    x = to_tensors({'image': np.asarray(fitted)}, (H, W))['image'][None]  # (1, 3, H, W)
    raw = model.eval()(x.to(next(model.parameters()).device))
    raw = {t: F.interpolate(o[..., :h, :w].float(), size=(image.height, image.width), mode='bilinear',
                            align_corners=False) for t, o in raw.items()}  # (1, C_t, image H, image W)
    return {name: v[0].cpu().numpy() for name, v in postprocess(raw, probabilities).items()}


# -------------------------------------------------------------------------------------------------
# Losses and metrics. Every definition follows the evaluation code that the NYUD-v2 / PASCAL-Context
# multi-task literature shares (MTI-Net -> ATRC -> InvPT / TaskPrompter, and SEISM / Piotr Dollar's
# edges toolbox for boundaries), so our numbers can sit next to the papers'. "The reference" below is
# that code (README, 'References', with links). Where it was silent or unusable as is, the choice is
# said in a comment.
# -------------------------------------------------------------------------------------------------

IGNORE_INDEX = 255  # void / padding label in semseg, human_parts, sal and edge targets

# Loss weight of each task (contract; = NYUD 1/1/10/50, PASCAL 1/2/5/10/50 as in ATRC / InvPT).
LOSS_WEIGHTS = {'semseg': 1.0, 'human_parts': 2.0, 'sal': 5.0, 'normals': 10.0, 'depth': 1.0, 'edge': 50.0}

# task -> (key of its main metric in meter.score(), higher is better)
MAIN_METRIC = {
    'semseg': ('mIoU', True), 'human_parts': ('mIoU', True), 'sal': ('maxF', True),
    'normals': ('mean', False), 'depth': ('rmse', False), 'edge': ('odsF', True),
}

# Boundary matching tolerance, as a fraction of the image diagonal (SEISM settings of the literature).
EDGE_MAX_DIST = {'nyud': 0.011, 'synthetic': 0.011, 'pascal': 0.0075}


def _depth_valid(target):
    """Valid depth pixels: 0 marks missing depth and padding; 255 is the reference's pad value."""
    return (target > 0) & (target != IGNORE_INDEX)


def _normals_valid(target):
    """Valid normal pixels (B, 1, H, W): the all-zero vector marks missing normals and padding."""
    return (target != 0).any(dim=1, keepdim=True)


def _balanced_bce(logit, target, pos_weight=None):
    """Binary cross-entropy with a weight w on positives and 1 - w on negatives, mean over the valid
    (non-255) pixels, as the reference BalancedBinaryCrossEntropyLoss (HED-style). pos_weight None:
    w = fraction of negatives among the valid pixels of the batch (saliency); else fixed (edge 0.95).
    logit, target (B, 1, H, W). The reference's BCE(pos_weight=w/(1-w)) / (1/(1-w)) is this formula."""
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
    """Weighted sum of the per-task losses (weights: LOSS_WEIGHTS); computed in fp32 even under autocast.
    `total, per_task = loss_fn(outputs, batch)`; outputs / batch hold task -> (B, C, H, W) tensors.
    A batch with no valid pixel for a task adds a zero (still differentiable) loss, never NaN."""

    def __init__(self, tasks, weights=None, edge_pos_weight=0.95):
        super().__init__()
        self.tasks = list(tasks)
        unknown = [t for t in self.tasks if t not in LOSS_WEIGHTS]
        if unknown:
            raise ValueError(f'MultiTaskLoss: unknown task(s) {unknown}; known: {sorted(LOSS_WEIGHTS)}')
        self.weights = {t: float((weights or {}).get(t, LOSS_WEIGHTS[t])) for t in self.tasks}
        self.edge_pos_weight = edge_pos_weight

    def task_loss(self, task, pred, target):
        pred = pred.float()
        if task in ('semseg', 'human_parts'):
            # CE summed over valid pixels / their count (reference CrossEntropyLoss: sum / max(n, 1))
            target = target.long()
            n = (target != IGNORE_INDEX).sum()
            return F.cross_entropy(pred, target, ignore_index=IGNORE_INDEX, reduction='sum') / n.clamp(min=1)
        if task == 'sal':
            return _balanced_bce(pred, target)
        if task == 'edge':
            return _balanced_bce(pred, target, self.edge_pos_weight)
        if task == 'normals':
            # reference L1Loss(normalize=True): |unit(pred) - gt| summed over the 3 components, averaged
            # over valid pixels (its masked_select takes 3 values per pixel but divides by pixels);
            # gt is the decoded 2 v / 255 - 1, not renormalised, as there (see data.decode_normals)
            valid = _normals_valid(target)
            err = (F.normalize(pred, p=2, dim=1) - target).abs() * valid
            return err.sum() / valid.sum().clamp(min=1)
        if task == 'depth':
            valid = _depth_valid(target)
            return ((pred - target).abs() * valid).sum() / valid.sum().clamp(min=1)
        raise ValueError(f'MultiTaskLoss: no loss for task {task!r}')

    def forward(self, outputs, batch):
        per_task = {t: self.task_loss(t, outputs[t], batch[t]) for t in self.tasks}
        total = sum(self.weights[t] * per_task[t] for t in self.tasks)
        return total, per_task


# ---- dense metrics: each meter accumulates sums over the whole split, read once by score() -------

class Meter:
    """A metric over a split. Its state is the tensors named in SUMS, each a sum over images, so the
    shards of a split add up (all-reduce them with SUM). The state lives on the device of the
    predictions given to update(), so no image waits for a copy to the host; score() reads it once."""
    SUMS = ()

    def state(self):
        """The sum tensors, in a fixed order (every process all-reduces the same list)."""
        return [getattr(self, k) for k in self.SUMS]

    def _to(self, device):
        for k, v in vars(self).items():
            if isinstance(v, torch.Tensor):
                setattr(self, k, v.to(device))


def _batched(pred, target):
    """Accept one image (C, h, w) or a batch (B, C, h, w); returns the prediction as (B, C, h, w) and
    the target as (B, C', h, w) on the prediction's device, detached."""
    pred = pred.detach()
    if pred.dim() == 3:
        pred = pred[None]
    return pred, target.detach().to(pred.device, non_blocking=True).reshape(pred.shape[0], -1, *pred.shape[-2:])


def _count(index, size):
    """Histogram (size,) int64 of an int64 tensor with values in [0, size), on its device.
    (torch.bincount on a GPU first copies the maximum to the host, a wait per call.)"""
    index = index.flatten()
    return torch.zeros(size, dtype=torch.int64, device=index.device).index_add_(0, index, torch.ones_like(index))


class SegMeter(Meter):
    """Semantic segmentation / human parts: one confusion matrix over the split (255 ignored).
    IoU_c = TP / max(TP + FP + FN, 1e-8) and mIoU = mean over ALL classes, as the reference
    SemsegMeter / HumanPartsMeter: a class absent from both GT and prediction scores 0 there (it never
    happens on the full NYUD / PASCAL val splits, but lowers mIoU on small subsets)."""
    SUMS = ('conf',)

    def __init__(self, num_classes):
        self.num_classes = num_classes
        self.conf = torch.zeros(num_classes, num_classes, dtype=torch.int64)  # (gt, pred)

    def update(self, pred, target):
        # checked where the target is (on the CPU, as the loader gives it): no wait on the device
        if ((target != IGNORE_INDEX) & ((target < 0) | (target >= self.num_classes))).any():
            raise ValueError(f'SegMeter: target labels must be in [0, {self.num_classes}) or {IGNORE_INDEX}')
        pred, target = _batched(pred, target)
        self._to(pred.device)
        label = pred.max(dim=1).indices  # (B, h, w): the first best class, as argmax (2x slower on CPUs)
        target = target.reshape(label.shape).long()
        C = self.num_classes
        idx = torch.where(target != IGNORE_INDEX, target * C + label, C * C)  # void pixels: a spare bin
        self.conf += _count(idx, C * C + 1)[:C * C].reshape(C, C)

    def score(self):
        self._to('cpu')
        conf = self.conf.double()
        tp = conf.diag()
        iou = tp / (conf.sum(0) + conf.sum(1) - tp).clamp(min=1e-8)
        return {'mIoU': 100 * iou.mean().item(), 'pixAcc': 100 * (tp.sum() / conf.sum().clamp(min=1)).item()}


class DepthMeter(Meter):
    """Depth over the valid pixels of the split: rmse = sqrt(sum sq err / n valid), log_rmse, abs_rel.
    As the reference DepthMeter, predictions <= 0 are set to 1e-9 (needed by the log; it also enters
    rmse and abs_rel, negligibly)."""
    SUMS = ('sq', 'log_sq', 'abs_rel', 'n')

    def __init__(self):
        self.sq, self.log_sq, self.abs_rel = (torch.zeros((), dtype=torch.float64) for _ in range(3))
        self.n = torch.zeros((), dtype=torch.int64)

    def update(self, pred, target):
        pred, target = _batched(pred, target)
        self._to(pred.device)
        valid = _depth_valid(target.reshape(pred.shape))
        p = pred.double().clamp(min=1e-9)
        g = torch.where(valid, target.reshape(pred.shape).double(), 1.0)  # 1 where invalid: finite log, ratio
        self.sq += torch.where(valid, (p - g) ** 2, 0).sum()
        self.log_sq += torch.where(valid, (p.log() - g.log()) ** 2, 0).sum()
        self.abs_rel += torch.where(valid, (p - g).abs() / g, 0).sum()
        self.n += valid.sum()

    def score(self):
        self._to('cpu')
        n = max(self.n.item(), 1)
        return {'rmse': (self.sq.item() / n) ** 0.5, 'log_rmse': (self.log_sq.item() / n) ** 0.5,
                'abs_rel': self.abs_rel.item() / n}


class NormalsMeter(Meter):
    """Angular error (degrees) between the unit-normalised prediction and GT over valid pixels: mean,
    rmse, median, and % of pixels under 11.25 / 22.5 / 30 deg (reference eval_normals). All but the
    median are exact sums; the median comes from a histogram of 0.01-deg bins (O(1) memory over the
    split, exact to +-0.005 deg; np.median of the reference needs every error).

    Valid = every non-zero GT vector, as the reference counts (see data.decode_normals): NYUD pixels
    stored black or grey where no normal was computed count too, so 'mean' is comparable with the
    papers'. 'strict_mean' is the mean error over the pixels whose stored vector is a plausible unit
    normal (length 0.5 to 1.5), i.e. without that fill: a stricter reading, not the papers' number."""

    BIN = 0.01  # degrees
    THRESHOLDS = (11.25, 22.5, 30.0)
    SUMS = ('hist', 'sum', 'sum_sq', 'below', 'n', 'strict_sum', 'strict_n')

    def __init__(self):
        self.hist = torch.zeros(int(round(180 / self.BIN)), dtype=torch.int64)
        self.sum, self.sum_sq = torch.zeros((), dtype=torch.float64), torch.zeros((), dtype=torch.float64)
        self.below = torch.zeros(len(self.THRESHOLDS), dtype=torch.int64)
        self.n = torch.zeros((), dtype=torch.int64)
        self.strict_sum, self.strict_n = torch.zeros((), dtype=torch.float64), torch.zeros((), dtype=torch.int64)

    def update(self, pred, target):
        pred, target = _batched(pred, target)
        self._to(pred.device)
        # float32 on the 3 component planes (B, h, w) at a time: 5x faster on a CPU than float64 over
        # (B, 3, h, w); the angle changes by < 1e-5 deg, the sums are still accumulated in float64
        p, g = pred.float().unbind(1), target.reshape(pred.shape).float().unbind(1)
        g_sq = g[0] * g[0] + g[1] * g[1] + g[2] * g[2]  # |g|^2 (B, h, w)
        # unit vectors as F.normalize(eps=1e-12) makes them: x / max(|x|, 1e-12)
        inv_p = (p[0] * p[0] + p[1] * p[1] + p[2] * p[2]).rsqrt_().clamp_(max=1e12)
        inv_g = g_sq.rsqrt().clamp_(max=1e12)
        diff_sq, sum_sq = torch.zeros_like(g_sq), torch.zeros_like(g_sq)  # |p - g|^2, |p + g|^2
        for a, b in zip(p, g):
            a, b = a * inv_p, b * inv_g
            diff_sq.addcmul_(a - b, a - b)
            sum_sq.addcmul_(a + b, a + b)
        # 2 atan2(|p - g|, |p + g|) = arccos(p . g), stable near 0 and 180 deg (reference NormalsMeter)
        err = torch.atan2(diff_sq.sqrt_(), sum_sq.sqrt_()).mul_(360 / math.pi)  # (B, h, w) degrees
        valid = g_sq > 0  # (B, h, w): not the zero vector (_normals_valid, without its slower any())
        bins = torch.where(valid, (err / self.BIN).long().clamp(max=len(self.hist) - 1), len(self.hist))
        self.hist += _count(bins, len(self.hist) + 1)[:-1]  # invalid pixels: the spare last bin
        err = torch.where(valid, err, 0)
        self.sum += err.sum(dtype=torch.float64)
        self.sum_sq += err.double().square().sum()
        self.below += torch.stack([((err < t) & valid).sum() for t in self.THRESHOLDS])
        self.n += valid.sum()
        strict = (g_sq > 0.25) & (g_sq < 2.25)  # |g| in (0.5, 1.5): a plausible unit normal was stored
        self.strict_sum += torch.where(strict, err, 0).sum(dtype=torch.float64)
        self.strict_n += strict.sum()

    def score(self):
        self._to('cpu')
        total = self.n.item()
        n = max(total, 1)
        cum = torch.cumsum(self.hist, 0)
        # np.median: mean of the values of rank (n-1)//2 and n//2 (0-based); each read at its bin centre
        ranks = torch.tensor([(total - 1) // 2, total // 2])
        median = ((torch.searchsorted(cum, ranks, right=True).double() + 0.5) * self.BIN).mean().item()
        out = {'mean': self.sum.item() / n, 'rmse': (self.sum_sq.item() / n) ** 0.5, 'median': median}
        out.update({f'{t:g}': 100 * b / n for t, b in zip(self.THRESHOLDS, self.below.tolist())})
        out['strict_mean'] = self.strict_sum.item() / max(self.strict_n.item(), 1)
        return out


class SaliencyMeter(Meter):
    """Saliency maxF (beta^2 = 0.3) over thresholds 0.05, 0.10, ..., 0.95, with TP / predicted /
    actual positives per threshold summed over the split (not per image), as the reference
    SaliencyMeter. Replicated quirk, for comparable numbers: the reference receives probabilities
    and applies a sigmoid AGAIN before thresholding, so the score is sigmoid(sigmoid(logit)), in
    [0.5, 0.731]: thresholds <= 0.5 mark everything salient, >= 0.75 nothing, and only 0.55, 0.60,
    0.65, 0.70 (probability >= 0.20, 0.41, 0.62, 0.85) discriminate."""
    SUMS = ('tp', 'pred_pos', 'gt_pos')

    def __init__(self, beta_sq=0.3):
        self.beta_sq = beta_sq
        self.thresholds = torch.arange(0.05, 1, 0.05)  # float32, as the reference
        self.tp = torch.zeros(len(self.thresholds), dtype=torch.int64)
        self.pred_pos = torch.zeros_like(self.tp)
        self.gt_pos = torch.zeros((), dtype=torch.int64)

    def update(self, pred, target):
        pred, target = _batched(pred, target)
        self._to(pred.device)
        valid = (target != IGNORE_INDEX).reshape(-1, 1)
        score = torch.sigmoid(torch.sigmoid(pred.float())).reshape(-1, 1)  # the double sigmoid, see above
        gt = (target == 1).reshape(-1, 1)
        above = (score >= self.thresholds) & valid  # (N, thresholds)
        self.tp += (above & gt).sum(0)
        self.pred_pos += above.sum(0)
        self.gt_pos += (gt & valid).sum()

    def score(self):
        self._to('cpu')
        tp, pred_pos, gt_pos = self.tp.double(), self.pred_pos.double(), self.gt_pos.double()
        prec, rec = tp / pred_pos, tp / gt_pos
        f = (1 + self.beta_sq) * prec * rec / (self.beta_sq * prec + rec)
        return {'maxF': 100 * torch.nan_to_num(f, nan=0.0).max().item()}


# ---- boundary detection: ODS / OIS F-measure as SEISM computes it (no MATLAB) ---------------------
# Pipeline per image (SEISM on the reference's saved predictions): edge NMS of the probability map
# (Dollar's edgesNmsMex with the orientation of edgesDetect), for each of 101 thresholds binarise
# (>= t) and thin to 1-px lines (MATLAB bwmorph 'thin'), then match one-to-one to the GT boundary
# pixels within max_dist * image diagonal (BSDS correspondPixels), counting matched / total predicted
# and matched / total GT pixels. ODS: counts summed over the split per threshold, best F. OIS: each
# image at its own best threshold, counts summed, F. Unlike the reference we keep float probabilities
# (it saves 8-bit PNGs before NMS and thresholding: a < 1/255 shift of each threshold). Cost on one
# CPU core, per 425x560 image: ~0.2 s for the flat maps of an untrained model (every threshold's map is
# nearly the whole image, so thinning dominates; see _thin_lanes), ~0.25 s for sharper maps (the exact
# matchings dominate); the Python port of correspondPixels (pyEdgeEval) takes 20-60 s per image.

# 0.001, 0.01, 0.02, ..., 0.99, 0.999: SEISM's 101 thresholds
EDGE_THRESHOLDS = np.concatenate([[0.001], np.arange(1, 100) / 100, [0.999]])


def _conv_tri(img, r):
    """Dollar's convTri for an integer radius r: separable triangle filter [1 .. r+1 .. 1] / (r+1)^2
    ([1 2 1] / 4 for r = 1) with 'symmetric' borders (scipy's 'reflect')."""
    f = np.concatenate([np.arange(1, r + 2), np.arange(r, 0, -1)]) / (r + 1) ** 2
    return ndi.correlate1d(ndi.correlate1d(img, f, axis=0, mode='reflect'), f, axis=1, mode='reflect')


def _edge_nms(E, r=1, s=5, m=1.01):
    """Non-maximum suppression of an edge probability map E (H, W), as the evaluation scripts of CNN
    edge detectors (HED / RCF, SEISM's nms_process, pyEdgeEval) do it with Dollar's toolbox: smooth
    E with convTri(E, 1), take the orientation of edgesDetect (second derivatives of convTri(E, 4)),
    then edgesNmsMex(E, O, r=1, s=5, m=1.01): a pixel survives if m * E is not below the bilinearly
    interpolated E at +-1..r px along the normal; the s-px image border is faded linearly (x / s)."""
    E = _conv_tri(E, 1)
    h, w = E.shape
    Oy, Ox = np.gradient(_conv_tri(E, 4))  # np.gradient = MATLAB gradient(2): central, one-sided at borders
    Oxx = np.gradient(Ox, axis=1)
    Oyy, Oxy = np.gradient(Oy)
    O = np.mod(np.arctan(Oyy * np.sign(-Oxy) / (Oxx + 1e-5)), np.pi)
    cos, sin = np.cos(O), np.sin(O)
    ys, xs = np.mgrid[0:h, 0:w]
    keep = E != 0
    flat = E.ravel()
    for d in [d for d in range(-r, r + 1) if d]:
        x = np.clip(xs + d * cos, 0, w - 1.001)
        y = np.clip(ys + d * sin, 0, h - 1.001)
        x0, y0 = x.astype(np.int64), y.astype(np.int64)
        dx, dy = x - x0, y - y0
        i = y0 * w + x0  # flat index of the top-left neighbour
        e0 = (flat[i] * (1 - dx) * (1 - dy) + flat[i + 1] * dx * (1 - dy)
              + flat[i + w] * (1 - dx) * dy + flat[i + w + 1] * dx * dy)
        keep &= E * m >= e0
    out = np.where(keep, E, 0.0)
    s = min(s, w // 2, h // 2)
    ramp = np.arange(s) / s
    out[:, :s] *= ramp
    out[:, w - s:] *= ramp[::-1]
    out[:s] *= ramp[:, None]
    out[h - s:] *= ramp[::-1, None]
    return out


# Thinning of MATLAB's bwmorph(BW, 'thin', Inf): the Guo-Hall parallel algorithm as given by Lam, Lee
# & Suen (TPAMI 1992, p. 879), two sub-iterations repeated until nothing changes. Neighbours x1..x8
# of a pixel start east and turn counter-clockwise. A pixel is deleted in a sub-iteration when
#   G1  X_H = 1, X_H = number of k in 1..4 with ~x_{2k-1} & (x_{2k} | x_{2k+1})      (x9 = x1)
#   G2  2 <= min(n1, n2) <= 3, n1 = number of k with x_{2k-1} | x_{2k}, n2 with x_{2k} | x_{2k+1}
#   G3  ((x2 | x3 | ~x8) & x1) = 0 in the first sub-iteration, ((x6 | x7 | ~x4) & x5) = 0 in the second.
# The boundary metric thins up to 101 nested maps of one image (one per threshold): all are thinned at
# once, bit-sliced. A pixel holds a 32- or 64-bit word whose bit k says that it is on in map k (lane k),
# and G1-G3 are evaluated as bitwise logic on the neighbours' words, for every lane in one numpy op.
# Only pixels next to a deletion are looked at again (the others see the same neighbourhood, hence
# keep their verdict), so the work follows the peeling fronts.
_NEIGHBOURS = [(0, 1), (-1, 1), (-1, 0), (-1, -1), (0, -1), (1, -1), (1, 0), (1, 1)]  # (drow, dcol)
# per sub-iteration, the neighbours (0-based) that its G3 reads, as (x1, x2, x3, x8) / (x5, x6, x7, x4),
# then the other four: most looked-at pixels fail G3 and never need those
_G3_FIRST = (np.array([0, 1, 2, 7, 3, 4, 5, 6]), np.array([4, 5, 6, 3, 0, 1, 2, 7]))
_FADE_RINGS = 4  # the edge NMS fades a 5-px image border: its maps differ by up to 4 partial rings


def _at_least_two(z):
    """z (..., 4, n) words -> the bits set in at least two of the 4 rows (..., n)."""
    a, b, c, d = z[..., 0, :], z[..., 1, :], z[..., 2, :], z[..., 3, :]
    return (a & b) | (c & d) | ((a | b) & (c | d))


def _thin_lanes(level, K):
    """Thin the K <= 64 nested maps {level > k}, k < K, of an int map level (H, W) >= 0 together
    -> (H, W) uint32 (K <= 32) or uint64, bit k = bwmorph(level > k, 'thin', Inf).

    Speed only: the maps of a flat prediction (an untrained model's) are the whole image less 0-4
    fading border rings; each is peeled ring by ring for hundreds of sub-iterations. Lane k starts
    two sub-iterations later per ring it lacks against lane 0 (area difference / lane 0's border), so
    the lanes' fronts coincide and one look at a front pixel serves them all. Each lane still runs
    exactly its own sequence of sub-iterations (it starts at an even one), hence its exact result."""
    h, w = level.shape
    W = w + 2
    word = np.uint32 if K <= 32 else np.uint64  # half the memory traffic when the lanes fit
    bits = np.array([(1 << k) - 1 for k in range(K + 1)], word)  # level l -> lanes 0..l-1
    S = np.zeros((h + 2, W), word)  # zero-padded
    S[1:-1, 1:-1] = bits[np.minimum(level, K)]
    inner = S[1:-1, 1:-1].copy()
    for dr, dc in _NEIGHBOURS:
        inner &= S[1 + dr:h + 1 + dr, 1 + dc:w + 1 + dc]
    border = S.copy()
    border[1:-1, 1:-1] &= ~inner  # lanes in which the pixel has an 'off' neighbour
    S, border = S.ravel(), border.ravel()
    first = np.flatnonzero(border)  # the only pixels a lane can delete in its first sub-iterations
    first_lanes = border[first]
    size = np.bincount(np.minimum(level, K).ravel(), minlength=K + 1)[::-1].cumsum()[::-1][1:]  # (K,) lane sizes
    rings = (size[0] - size) / max(1, np.count_nonzero(first_lanes & word(1)))
    start = 2 * np.minimum(_FADE_RINGS, np.rint(rings)).astype(int)
    lanes_at = {t: np.bitwise_or.reduce(bits[1:][start == t] - bits[:-1][start == t]) for t in set(start.tolist())}

    off = np.array([dr * W + dc for dr, dc in _NEIGHBOURS])
    check = [first[:0]] * 2  # pixels to look at in sub-iteration 0 / 1
    slot = np.zeros(len(S), np.int64)  # scratch to drop repeated neighbours
    active = word(0)
    quiet, it = 0, 0
    while it <= start.max() or quiet < 2:  # two sub-iterations in a row without deletion: converged
        s = it % 2
        if it in lanes_at:  # these lanes begin: look at their border pixels in both sub-iterations
            active |= lanes_at[it]
            add = first[(first_lanes & lanes_at[it]) != 0]
            check = [np.concatenate([c, add]) for c in check]
            quiet = 0
        pix, check[s] = check[s], first[:0]
        order = _G3_FIRST[s]
        g3 = S[off[order[:4], None] + pix]  # (4, n): x1 x2 x3 x8, or x5 x6 x7 x4
        ok = S[pix] & active & ~((g3[1] | g3[2] | ~g3[3]) & g3[0])  # on and G3, per lane
        keep = np.flatnonzero(ok)
        pix, ok = pix[keep], ok[keep]
        x = np.empty((9, len(pix)), word)  # x1..x8, x9 = x1
        x[order[:4]] = g3[:, keep]
        x[order[4:]] = S[off[order[4:], None] + pix]
        x[8] = x[0]
        odd, even = x[0:8:2], x[1:9:2]  # x_{2k-1}, x_{2k} for k = 1..4
        z = np.empty((3, 4, len(pix)), word)
        np.bitwise_or(odd, even, out=z[0])  # n1 counts these
        np.bitwise_or(even, x[2:9:2], out=z[1])  # n2 counts these
        np.bitwise_and(z[1], ~odd, out=z[2])  # X_H counts these
        two = _at_least_two(z)  # (3, n)
        g1 = np.bitwise_or.reduce(z[2], axis=0) & ~two[2]  # X_H = 1
        g2 = two[0] & two[1] & ~(np.bitwise_and.reduce(z[0], axis=0) & np.bitwise_and.reduce(z[1], axis=0))
        dead = ok & g1 & g2
        hit = np.flatnonzero(dead)
        if len(hit):
            pix = pix[hit]
            S[pix] &= ~dead[hit]
            near = (off[:, None] + pix).ravel()
            seq = np.arange(len(near))
            slot[near] = seq
            near = near[(slot[near] == seq) & (S[near] != 0)]  # each 'on' pixel once
            check = [np.concatenate([c, near]) for c in check]
            quiet = 0
        else:
            quiet += 1
        it += 1
    return S.reshape(h + 2, W)[1:-1, 1:-1]


def thin(mask):
    """bwmorph(mask, 'thin', Inf) of a bool image (H, W)."""
    return _thin_lanes(np.asarray(mask, np.int64), 1) != 0


def _maximum_matching(p, g, mate_p, mate_g):
    """Grow a matching of the bipartite graph with edges (p[i], g[i]) (sorted by p) to maximum
    cardinality, in place; returns its size. The missing augmenting paths are found at once as a
    max flow (Dinic, in C) on the residual network of the current matching: source -> free p -> g
    along unmatched edges, matched g -> its p, free g -> sink."""
    size = int((mate_p >= 0).sum())
    new_p = np.r_[True, p[1:] != p[:-1]] if len(p) else np.zeros(0, bool)
    ids = p[new_p]  # predicted pixels that have a pair; node 1 + i is ids[i]
    node = np.cumsum(new_p) - 1  # (pairs,) compact id of p
    free_p = np.flatnonzero(mate_p[ids] < 0)
    free_g = (mate_g < 0) & (np.bincount(g, minlength=len(mate_g)) > 0)
    if len(free_p) == 0 or not free_g.any():  # one side saturated: no augmenting path can exist
        return size
    n, n_g = len(ids), len(mate_g)
    sink = 1 + n + n_g
    compact = np.full(len(mate_p), -1)
    compact[ids] = np.arange(n)
    unmatched = mate_p[p] != g
    # CSR rows in node order: source, predicted pixels (their unmatched pairs), GT pixels (one edge
    # each: to their match, or to the sink when free), sink
    fan_out = np.concatenate([[len(free_p)], np.bincount(node[unmatched], minlength=n), np.ones(n_g, np.int64), [0]])
    gt_next = np.where(mate_g >= 0, 1 + compact[mate_g], sink)
    indices = np.concatenate([1 + free_p, 1 + n + g[unmatched], gt_next])
    indptr = np.concatenate([[0], np.cumsum(fan_out)])
    graph = csr_array((np.ones(len(indices), np.int32), indices, indptr), shape=(sink + 1, sink + 1))
    result = maximum_flow(graph, 0, sink, method='dinic')
    if result.flow_value == 0:
        return size
    flow = result.flow.tocoo()
    fr, to = flow.row[flow.data > 0], flow.col[flow.data > 0]
    undo = (fr > n) & (fr < sink) & (to >= 1) & (to <= n)  # matched g -> p carrying flow: unmatched
    mate_p[ids[to[undo] - 1]], mate_g[fr[undo] - 1 - n] = -1, -1
    new = (fr >= 1) & (fr <= n) & (to > n) & (to < sink)  # p -> g carrying flow: matched
    mate_p[ids[fr[new] - 1]], mate_g[to[new] - 1 - n] = to[new] - 1 - n, ids[fr[new] - 1]
    return size + int(result.flow_value)


def _edge_counts(prob, target, max_dist):
    """One image: prob (H, W) edge probability, target (H, W) in {0, 1, 255} -> int64 counts
    (thresholds, 4): matched predicted, predicted, matched GT, GT boundary pixels.

    Matching: BSDS's correspondPixels is a min-cost assignment whose outlier cost (100 x radius)
    aims at a maximum-cardinality matching of the pixel pairs within the radius; we compute that
    maximum exactly. (correspondPixels gives unmatched pixels only a few random outlier slots, so it
    can miss it: on our synthetic checks against its pyEdgeEval port it found 0-0.5 % fewer matches,
    and its F was ~0.1 point lower.) One-to-one, so matched predicted = matched GT. GT boundary =
    thinned (target == 1): our targets already are edge maps; 255 pixels count neither as GT nor as
    prediction."""
    h, w = prob.shape
    valid = target != IGNORE_INDEX
    nms = _edge_nms(prob) * valid
    gr, gc = np.nonzero(thin((target == 1) & valid))
    counts = np.zeros((len(EDGE_THRESHOLDS), 4), np.int64)
    counts[:, 3] = len(gr)

    # every binarised map nms >= t, thinned at once. Only the distinct maps are lanes: the map changes
    # at threshold j only if some value lies in [t_j-1, t_j). level = thresholds at or below a value.
    level = np.searchsorted(EDGE_THRESHOLDS, nms, side='right')  # (H, W) in 0..101
    present = np.bincount(level.ravel(), minlength=len(EDGE_THRESHOLDS) + 1) > 0
    present[0] = False
    rank = np.cumsum(present)  # level -> number of lanes holding its pixels; lane i = {rank > i}
    lane_of = rank[:-1]  # threshold j: the map {level > j} = the lane after rank[j] (K: empty)
    K, rank = rank[-1], rank[level]
    thinned = [_thin_lanes(np.clip(rank - g, 0, 64), min(64, K - g)) for g in range(0, K, 64)]
    pr, pc = np.nonzero(np.any([t != 0 for t in thinned], axis=0))  # predicted pixels kept at some threshold
    words = [t[pr, pc] for t in thinned]

    # all (predicted, GT) pairs within the radius, once per image, sorted by predicted then GT pixel;
    # each threshold keeps the pairs of its surviving predicted pixels
    radius = max_dist * np.hypot(h, w)
    R = int(radius)
    index = np.full((h + 2 * R, w + 2 * R), -1)  # predicted-pixel id, padded by R
    index[pr + R, pc + R] = np.arange(len(pr))
    p, g = [], []
    for dr in range(-R, R + 1):
        for dc in range(-R, R + 1):
            if dr * dr + dc * dc <= radius * radius:
                ids = index[gr + dr + R, gc + dc + R]  # predicted pixel at this offset from each GT pixel
                hit = np.flatnonzero(ids >= 0)
                p.append(ids[hit]), g.append(hit)
    p, g = np.concatenate(p), np.concatenate(g)
    order = np.lexsort((g, p))
    p, g = p[order], g[order]

    # thresholds from high to low: the maximum matching of one threshold warm-starts the next. Its
    # restriction to the surviving pixels can only be improved by augmenting paths that start at a
    # newly kept predicted pixel or end at a GT pixel whose match was thinned away (else the path
    # would have augmented the previous maximum matching): without either, it is still maximum.
    has_pair = np.bincount(p, minlength=len(pr)) > 0
    mate_p, mate_g = np.full(len(pr), -1), np.full(len(gr), -1)
    kept = np.zeros(len(pr), bool)
    matched = 0
    for k in reversed(range(len(EDGE_THRESHOLDS))):
        lane = lane_of[k]
        if k + 1 < len(EDGE_THRESHOLDS) and lane == lane_of[k + 1]:  # same map as at k + 1
            counts[k] = counts[k + 1]
            continue
        was_kept = kept
        kept = (words[lane // 64] >> int(lane % 64) & 1) != 0 if lane < K else kept & False
        lost = (mate_p >= 0) & ~kept
        mate_g[mate_p[lost]], mate_p[lost] = -1, -1
        if lost.any() or (kept & ~was_kept & has_pair).any():
            live = kept[p]
            matched = _maximum_matching(p[live], g[live], mate_p, mate_g)
        counts[k, :3] = matched, kept.sum(), matched
    return counts


def _f_measure(counts):
    """F of (..., 4) counts [matched pred, pred, matched GT, GT]; 0 where precision or recall is
    undefined or both are 0 (SEISM's conventions)."""
    counts = np.asarray(counts, np.float64)
    prec = np.divide(counts[..., 0], counts[..., 1], out=np.zeros(counts.shape[:-1]), where=counts[..., 1] > 0)
    rec = np.divide(counts[..., 2], counts[..., 3], out=np.zeros(counts.shape[:-1]), where=counts[..., 3] > 0)
    return np.divide(2 * prec * rec, prec + rec, out=np.zeros_like(prec), where=prec + rec > 0)


def _edge_job(logit, target, max_dist):
    """One image's boundary counts (see _edge_counts) from its logits (H, W) float32, and the CPU
    seconds they took; what a worker of an EdgePool runs."""
    t0 = time.process_time()
    prob = torch.sigmoid(torch.from_numpy(logit).double()).numpy()
    return _edge_counts(prob, target, max_dist), time.process_time() - t0


class EdgePool(concurrent.futures.ProcessPoolExecutor):
    """Worker processes that score boundaries while the model runs on the next batches. Spawned (not
    forked): safe beside CUDA and threads. Shut it down (or use it in a `with`) when done."""

    def __init__(self, workers):
        # one thread each: the workers together already hold the cores
        super().__init__(workers, mp_context=multiprocessing.get_context('spawn'),
                         initializer=torch.set_num_threads, initargs=(1,))
        self.workers = workers

    def start(self):
        """Start every worker now, in the background (a spawned worker takes seconds to import torch;
        otherwise they start at the first image). Returns futures that are done once they run."""
        return [self.submit(int) for _ in range(self.workers)]


class EdgeMeter(Meter):
    """Boundary ODS / OIS F-measure (%) over the split, SEISM style (see `_edge_counts`). Each image
    is scored as it arrives, so memory stays O(thresholds); max_dist is relative to the diagonal.
    With a pool (EdgePool) the images are scored in its workers: update() returns at once unless
    2 x workers images are still waiting; state() and score() wait for all. Same sums either way."""
    SUMS = ('counts', 'ois')

    def __init__(self, max_dist, pool=None):
        self.max_dist, self.pool = max_dist, pool
        self.counts = torch.zeros(len(EDGE_THRESHOLDS), 4, dtype=torch.int64)  # summed over images
        self.ois = torch.zeros(4, dtype=torch.int64)  # each image at its own best threshold, summed
        self.pending = collections.deque()  # futures of the images in the pool
        self.seconds = 0.0  # CPU time spent scoring, summed over images

    def update(self, pred, target):
        pred = pred.detach()[None] if pred.dim() == 3 else pred.detach()
        logit = pred[:, 0].float().cpu().numpy()  # (B, h, w): each map's one copy to the host
        target = target.detach().cpu().reshape(logit.shape).to(torch.uint8).numpy()
        for p, t in zip(logit, target):
            if self.pool is None:
                self._add(*_edge_job(p, t, self.max_dist))
                continue
            self.pending.append(self.pool.submit(_edge_job, p, t, self.max_dist))
            while len(self.pending) > 2 * self.pool.workers:  # bounded backlog: memory, honest progress
                self._add(*self.pending.popleft().result())

    def _add(self, counts, seconds):
        self.counts += torch.from_numpy(counts)
        self.ois += torch.from_numpy(counts[np.argmax(_f_measure(counts))])
        self.seconds += seconds

    def wait(self):
        """Add the counts of every image still in the pool."""
        while self.pending:
            self._add(*self.pending.popleft().result())

    def state(self):
        self.wait()
        return super().state()

    def score(self):
        self.wait()
        counts, ois = self.counts.numpy(), self.ois.numpy()
        f = _f_measure(counts)
        return {'odsF': 100 * float(f.max()), 'oisF': 100 * float(_f_measure(ois)),
                'odsT': float(EDGE_THRESHOLDS[f.argmax()])}  # odsT: the ODS threshold


# The published PASCAL-Context boundary F of this family (ATRC, InvPT, TaskPrompter, TaskExpert) is
# computed by SEISM on its test_new subset of val: 2,498 of the 5,105 ids (jponttuset/seism,
# src/gt_wrappers/gt_sets/PASCALContext/test_new.txt). Stored as a bitmask, bit n of row y-2008 for id
# 'y_00000n' (y in 2008..2010, n < 10000), packed, zlib-compressed and base85-encoded.
_TEST_NEW = (
    'c-rljO^)3-41`I5nl%N;i@C)dfdb^c9^iN194%kTSC~bBv^(ALk3^BhVv)TpExERtWzVq1i^;3jZRS`WWwwoF<sQxL6P=}2YgdJvwaBt'
    'Hf`uOD_F$p!vX)iGJKM?KWiidd${WX6L}J3147uB|O0RNUahtLeA1iJ$*`s|JVhKLjxV1NVVr%xRI5P?_Fg81u_!&K|V#s`WEBtpH@O<'
    '!>;MV@{u}*B)h5ritgzuX(=DhL9iFXue$eIndbz@BuB|gUE`Hy`BgY(qV*fDT)O^d}MV}E05?P__k1b;T)1$GQ}J=z<5`Gq@MAX>6_6y'
    '^zkf(iD|(fCrF**I$E6M1DMpJh;R0%FPyj@$>}m}_^}e-RJ(DOLPtt;Pu(u)22R4H=47{#CF7(FPW6<n(FE9Rck4B$2>?j}d3%7GuE$>'
    '_Vdr`3nPlD!~UX&IAk&)ZM=IVuLbX>sjf}y2Xw93eB#wX9RBSajiGuvn$`V#6`QiH<1Jy`1!2N5O7+5vWV*LByuXbDKwYJ23%{vLs1CA'
    'v3&4u^|&1XSQ|vbZBD!=6N7{BjD;OeEa*in(c!j<nYia5Cgz#g5PK;cx%X0tCje*lRr6bNChXumnnJ!<bdK1v;m0C&G6pB*_t?2xvq{~'
    '_F54kviSk2F3(WR8uYbCo3ayBxjJe&<5-c6WJHWw}^pncV#166rRti`A8V*5Z9l~SAmV;6$$($h@En=%6BEA`-tI+ckx1hJ{iGy@M#j0'
    'qO-aqxKhx9J;Y`#i46@7OL#7DF(1u)<$rF7Pls1$P>kaobD07$A;-9#*wlhTbM`lXkdu*vdXZRDZg3YYxo=gzZ_g98?pib}6BpbFmb0b'
    'vrErKBq<wZ8n>{3&}GdUyisSBHIf-^gr|JZaM)%Ssy6hbWuU#I7#{gV=3Q=r}1ZOC|IV`9q05P&4|Fz(_DUnU5xqaCFN5TC3)eL<|n(!'
    '(&I!Sg~>LqZ2)@;1j%|KJ38yc7+h>k7D8JDNq<z#68MSQ1?6%F?%A*_K1J@NMR`mQm}$Doyqo1DNtpho+9ma>5wAf1Rx(Ga0tn%TKDUy'
    '5B2n@X2@Gf``|CNCSRp|wk}ok$E9Max{^z;W~DNN8cIP>8lX5rMWK-yA*9olL8ZTrTFGGThs7Iv;tYr$*?X5&S0@oR(y>*eKerwwEr%C'
    'B*U$AoTrivZ(ByWxbcs>I#j$ooL3%YcaxIY$zK<h%eXEkFGiegaKh;~+4eXQ$ZIQ<6pBbuRr;MV#@}G-egkk@Sa<F@A%GxVhNRyh5J%x'
    'Fcix#F6qxOyDjN`ziNv*z3EpKVe=p3J00*P4TQ|pozZYcgfrV8^K^hss}BBJ3}od%v9!0D=9N=##pG+}xp+JO!1G^YmlM<q_Ll%$?;>x'
    'hajNwor^bF&zk0JsZ1RwFlhX{&Cp&>&sXi&;m&P0}raNlB=hf4|SL1@g3LerY?sNfjA6)Iku9+Bq~E(RQ0~Nv4cV(|sq^g$RPZG>y?u3'
    'eQ9!$lSlLyCkvG_RlP+=rn^#hDd&WSE$R>+z9qN|D?k9X9`)33|pGEG>g(th<YA1k`N8Kg(9CG-;Q4$$-0*^wOB&G<SV*=#+m@Cl$iFe'
    'edwk%Uz3*~e%TplrN$D>nePBk)->R2G<5a9GsKEg<IMF+AQa)<8GJR~EtujAAm4Y;B8R7I$9zg0`nmp=>o+F4(18'
)


def _decode_ids(text):
    bits = np.unpackbits(np.frombuffer(zlib.decompress(base64.b85decode(text)), np.uint8)).reshape(3, 10000)
    return frozenset(f'{2008 + y}_{n:06d}' for y, n in zip(*np.nonzero(bits)))


# dataset -> (name, ids) of the val images whose boundaries are scored; other datasets: all of them
EDGE_SUBSETS = {'pascal': ('test_new', _decode_ids(_TEST_NEW))}


def make_meters(tasks, dataset, pool=None):
    """task -> meter for `tasks` (TASKS[dataset]: task -> output channels, which give the classes);
    pool: an EdgePool for the boundary metric, or None to score boundaries here."""
    if dataset not in EDGE_MAX_DIST:
        raise ValueError(f'make_meters: unknown dataset {dataset!r}; expected one of {sorted(EDGE_MAX_DIST)}')
    meters = {}
    for task, channels in tasks.items():
        if task in ('semseg', 'human_parts'):
            meters[task] = SegMeter(channels)
        elif task in ('sal', 'normals', 'depth'):
            meters[task] = {'sal': SaliencyMeter, 'normals': NormalsMeter, 'depth': DepthMeter}[task]()
        elif task == 'edge':
            meters[task] = EdgeMeter(EDGE_MAX_DIST[dataset], pool)
        else:
            raise ValueError(f'make_meters: unknown task {task!r}; known: {sorted(MAIN_METRIC)}')
    return meters


def update_meters(meters, outputs, batch, edge_ids=None, seconds=None):
    """Feed one batch to `meters` (make_meters). outputs: task -> raw predictions (B, C, H, W) on any
    device; batch: the loader's batch (targets on the CPU, 'meta'). Each image is cropped to
    meta['size']; human parts count only on images with a person (meta['has_human']), boundaries only
    on the ids in edge_ids (None: every image). seconds: dict task -> seconds, added to (with a
    device synchronisation per update, so only when timing)."""
    # boundaries first: with a pool, its workers score them while the other meters run here
    for t, meter in sorted(meters.items(), key=lambda item: item[0] != 'edge'):
        for i, meta in enumerate(batch['meta']):
            h, w = meta['size']
            if t == 'human_parts' and not meta.get('has_human', False):
                continue
            if t == 'edge' and edge_ids is not None and meta['id'] not in edge_ids:
                continue
            t0 = time.perf_counter()
            meter.update(outputs[t][i:i + 1, :, :h, :w], batch[t][i:i + 1, ..., :h, :w])
            if seconds is not None:
                if outputs[t].is_cuda:
                    torch.cuda.synchronize(outputs[t].device)
                seconds[t] = seconds.get(t, 0.0) + time.perf_counter() - t0


def delta_m(results, baselines):
    """Multi-task gain Delta_m (%) over single-task baselines (Maninis et al. 2019, as the literature
    reports it): mean over tasks of (-1)^l_t (M_t - M_single_t) / M_single_t * 100, l_t = 1 when lower
    is better. results, baselines: task -> main metric value (MAIN_METRIC)."""
    missing = [t for t in results if t not in baselines]
    if missing:
        raise ValueError(f'delta_m: no baseline for task(s) {missing}')
    gains = [(1 if MAIN_METRIC[t][1] else -1) * (results[t] - baselines[t]) / baselines[t] * 100 for t in results]
    return sum(gains) / len(gains)
