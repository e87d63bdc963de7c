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
import math
import os

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

# Output channels of each task's head, per dataset (the synthetic scenes use the NYUD layout).
TASKS = {
    'nyud': {'semseg': 40, 'depth': 1, 'normals': 3, 'edge': 1},
    'pascal': {'semseg': 21, 'human_parts': 7, 'sal': 1, 'normals': 3, 'edge': 1},
}

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
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.normal_(self.cls_token, std=1e-6)
        self.apply(_init_vit_weights)

    def set_grid(self, grid):
        """Resample the position embedding in place to a new token grid (h, w)."""
        with torch.no_grad():
            self.pos_embed = nn.Parameter(resample_pos_embed(self.pos_embed.data, grid, self.grid))
        self.grid = tuple(grid)

    def forward_features(self, x, taps=()):
        """(B, 3, H, W) -> (tokens after the final norm (B, 1 + N, C) as timm's forward_features,
        [X_l for l in taps] each (B, N, C) without the class token)."""
        grid = (x.shape[-2] // PATCH, x.shape[-1] // PATCH)
        x = self.patch_embed(x)  # (B, N, C)
        pos = self.pos_embed
        if grid != self.grid:  # an input size other than the training size: resample for this call
            pos = resample_pos_embed(pos, grid, self.grid)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + pos  # (B, 1 + N, C)
        tapped = []
        for i, blk in enumerate(self.blocks):
            x = blk(x)
            if i + 1 in taps:
                tapped.append(x[:, 1:])
        return self.norm(x), tapped


def _init_vit_weights(m):
    if isinstance(m, nn.Linear):
        nn.init.trunc_normal_(m.weight, std=0.02)
        nn.init.zeros_(m.bias)


# -------------------------------------------------------------------------------------------------
# Memorial Mixture-of-Experts (paper Sec. 3, Fig. 2)
# -------------------------------------------------------------------------------------------------

class MMoE(nn.Module):
    """One MMoE module at backbone block l.

    Experts (shared by all tasks) decompose X_l into E task-generic features
        Z_e = GELU(LN_e(W_e X_l)),                                  each (B, N, D)
    and a context-aware gate per task mixes them with the task's memory M_t as an extra expert
        g_t = softmax(W_t [X_l ; mean_N(X_l)] + b_t)                 over E (+1) candidates
        F_t = sum_e g_t,e Z_e + g_t,E+1 M_t                          (B, N, D)
    after which the memory is written, M_t <- F_t ('replace') or M_t + F_t ('add').
    At the first MMoE the memory is still empty: its gates weigh the E experts only.

    Our choices where the paper is silent: experts are Linear -> LayerNorm -> GELU; the gate sees
    each token together with the image mean (its context); it is softmaxed per token by default or,
    with gate='image', once per image from the mean of the token logits.
    """

    def __init__(self, tasks, in_dim, num_experts, expert_dim, first, gate, memory_write):
        super().__init__()
        self.E, self.D, self.first = num_experts, expert_dim, first
        self.gate_mode, self.memory_write = gate, memory_write
        # E experts in one Linear, C -> E*D, then a LayerNorm per expert (own affine parameters)
        self.experts = nn.Linear(in_dim, num_experts * expert_dim)
        self.expert_norm_weight = nn.Parameter(torch.ones(num_experts, expert_dim))
        self.expert_norm_bias = nn.Parameter(torch.zeros(num_experts, expert_dim))
        n_candidates = num_experts if first else num_experts + 1
        self.gates = nn.ModuleDict({t: nn.Linear(2 * in_dim, n_candidates) for t in tasks})

    def forward(self, x, memory):
        """x: X_l (B, N, C); memory: dict task -> M_t (B, N, D), or None at the first MMoE.
        Returns (new memory dict task -> (B, N, D), gate weights dict task -> (B, N, E or E+1))."""
        B, N, _ = x.shape
        z = self.experts(x).reshape(B, N, self.E, self.D)
        z = F.layer_norm(z, (self.D,), eps=1e-6) * self.expert_norm_weight + self.expert_norm_bias
        z = F.gelu(z)  # (B, N, E, D) = the E task-generic features Z_e
        context = torch.cat([x, x.mean(dim=1, keepdim=True).expand(-1, N, -1)], dim=-1)  # (B, N, 2C)
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
    """Per-task decoder on the final memory (our choice; the paper gives no details):
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


class TaskExpert(nn.Module):
    """ViT backbone + MMoE at the tapped blocks + one head per task on the final memory.

    tasks: dict task -> output channels (see TASKS). Options (defaults = our reading of the paper):
      backbone      'tiny' | 'small' | 'base' | 'large' (paper: large on NYUD, base on PASCAL)
      img_size      training size (H, W), divisible by 16; sets the position-embedding grid
      num_experts   E, the shared experts per MMoE (paper: 8 by our reading)
      expert_dim    D, the expert width (default by backbone: 256 tiny/small, 512 base, 768 large)
      taps          1-based backbone blocks carrying an MMoE (default: 4 evenly spaced, the last one)
      gate          'token' (a mixture per token) | 'image' (one mixture per image)
      memory_write  'replace' (M_t <- F_t) | 'add' (M_t <- M_t + F_t)
      drop_path     stochastic depth of the backbone (default 0.15 for base/large, 0 for tiny/small)
    After a forward pass, `self.gates` holds one dict per tap: task -> gate weights (B, N, E[+1]).
    """

    def __init__(self, tasks, backbone='large', img_size=(448, 576), num_experts=8, expert_dim=None,
                 taps=None, gate='token', memory_write='replace', drop_path=None):
        super().__init__()
        if backbone not in VIT_PRESETS:
            raise ValueError(f'unknown backbone {backbone!r}: choose one of {", ".join(VIT_PRESETS)}')
        if img_size[0] % PATCH or img_size[1] % PATCH:
            raise ValueError(f'image size {tuple(img_size)} must be divisible by {PATCH}')
        if gate not in ('token', 'image') or memory_write not in ('replace', 'add'):
            raise ValueError(f'gate must be token|image and memory_write replace|add, got {gate!r}, {memory_write!r}')
        p = VIT_PRESETS[backbone]
        self.tasks = dict(tasks)
        self.taps = tuple(p['taps'] if taps is None else taps)
        if not self.taps or any(not 1 <= l <= p['depth'] for l in self.taps) or list(self.taps) != sorted(set(self.taps)):
            raise ValueError(f'taps {self.taps} must be increasing blocks in 1..{p["depth"]}')
        expert_dim = expert_dim or p['expert_dim']
        self.backbone = VisionTransformer(p['embed_dim'], p['depth'], p['num_heads'], img_size,
                                          p['drop_path'] if drop_path is None else drop_path)
        self.mmoe = nn.ModuleList(
            MMoE(self.tasks, p['embed_dim'], num_experts, expert_dim, i == 0, gate, memory_write)
            for i in range(len(self.taps)))
        self.heads = nn.ModuleDict({t: TaskHead(expert_dim, c) for t, c in self.tasks.items()})
        # The final LayerNorm is only there so timm checkpoints load strictly: the MMoEs read the
        # un-normed block outputs, so it gets no gradient (frozen, which also keeps DDP happy).
        self.backbone.norm.requires_grad_(False)
        self.gates = []

    def forward(self, x):
        """x (B, 3, H, W) ImageNet-normalised -> dict task -> raw prediction (B, C_t, H, W)."""
        grid = (x.shape[-2] // PATCH, x.shape[-1] // PATCH)
        _, tapped = self.backbone.forward_features(x, self.taps)
        memory, self.gates = None, []
        for mmoe, x_l in zip(self.mmoe, tapped):
            memory, g = mmoe(x_l, memory)
            self.gates.append(g)
        # the memory after the last MMoE feeds every task's final prediction (paper Fig. 2)
        return {t: head(memory[t], grid, x.shape[-2:]) for t, head in self.heads.items()}


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


def load_pretrained(model, path):
    """Load an ImageNet ViT checkpoint into model.backbone, strictly.

    Accepts a timm state dict (.pth/.pt/.bin, possibly wrapped in {'model': ...} or {'state_dict':
    ...}, keys possibly prefixed 'module.' or '_orig_mod.'), a .safetensors file, or Google's .npz.
    The classifier ('head.*', 'fc_norm.*') is dropped; every other key must match in name and
    shape, except pos_embed, which is resampled (bicubic, fp32) to the model's training grid.
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f'pretrained checkpoint {path} does not exist')
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
