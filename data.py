"""The benchmarks: NYUD-v2 and PASCAL-Context as the multi-task literature distributes and scores them, and
synthetic rooms in the NYUD layout. "The reference": the ATRC / InvPT data and evaluation code, SEISM (README).

A sample (the contract): a dict of tensors at the network size (H, W); each target by its task's kind.
  image    float32 (3, H, W), ImageNet-normalised; padding 0
  classes  int64 (H, W) class ids (semseg, human_parts); 255 = void and padding
  binary   float32 (1, H, W) in {0, 1} (sal, edge); 255 = padding
  normals  float32 (3, H, W) as stored, 2 v / 255 - 1; the zero vector = invalid and padding
  depth    float32 (1, H, W) metres; 0 = invalid and padding
  meta     {'id', 'size': (h, w) of the unpadded content, 'unscored': the tasks the benchmark does not
           score on this image, 'read_as': the conversions its image file took}
Before to_tensors, a sample is numpy in HWC layout: image uint8 (h, w, 3), labels uint8 (h, w), depth and
normals float32 (h, w[, 3]).
"""
import base64, collections, colorsys, concurrent.futures, json, math, multiprocessing, os, signal, sys, types, zlib

import numpy as np
import scipy.io, scipy.ndimage
import torch
import torch.nn.functional as F
from PIL import Image
from scipy.sparse import csr_array
from scipy.sparse.csgraph import maximum_flow

from taskexpert import (IGNORE_INDEX, PATCH, RGB_READS, TASK_SET, TASK_TABLE, TASKS, atomic_write, depth_valid,
                        normalise, postprocess, unknown_kind)


# ---- The readers: which file each task's target comes from, and how it is decoded -----------------
def edge_target(labels, split, train_target):
    """The edge target from the label map the boundaries are drawn from: to train on, the reference's
    train_target(labels); on the val split, what the benchmarks score: SEISM's gt_boundary(labels)."""
    return gt_boundary(labels) if split == 'val' else train_target(labels)


class _MultiTaskDataset(torch.utils.data.Dataset):
    """What the readers share: the ids, load -> (augment | pad) -> tensors; `rng` draws the augmentations."""
    dataset = SIZE = SPLITS = IMAGES = None  # its key of TASKS, network size, split files' folder, images' files
    FILES = {}  # task -> (folder, extension, decode(file, s) -> target); s: what the sample's decoders share

    def __init__(self, root, split='train', train=True, size=None, tasks=None, seed=0):
        self.tasks = _checked_tasks(self, tasks, root)
        self.root, self.split, self.train, self.size = root, split, train, tuple(size or self.SIZE)
        self.rng = np.random.default_rng(seed)
        self.subsets = {}  # task -> the images its meter scores, for a task scored on part of the split
        split_file = os.path.join(root, self.SPLITS, f'{split}.txt')
        self.ids = _read_split(split_file)
        _check_files([self.path(f, i) for i in self.ids for f in self.needs()], split_file)

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        sample, meta = self.load(i)
        if self.train:
            sample, meta['size'] = augment(sample, self.size, self.rng)
        else:  # only padded: the image must fit the network
            _check_fits(self, i, *meta['size'])
        out = to_tensors(sample, self.size)
        out['meta'] = meta
        return out

    def load(self, i):
        """Sample i -> (its arrays: the image and each task's target as FILES decodes it, its meta)."""
        id_ = self.ids[i]
        image, read_as = _image(self.path('image', id_))
        s = self.shared(id_, image.shape[:2])
        sample = {'image': image}
        for t in self.tasks:
            p = self.path(t, id_)
            sample[t] = self.FILES[t][2](p, s)
            _check_shape(p, sample[t], s.shape)
        return sample, {'id': id_, 'size': s.shape, 'unscored': tuple(s.unscored), 'read_as': read_as}

    def shared(self, id_, shape):  # what the decoders of a sample share
        return types.SimpleNamespace(split=self.split, shape=shape, unscored=[])

    def path(self, name, id_):  # the file of `name` ('image' or a task) of sample `id_`
        folder, ext = self.IMAGES if name == 'image' else self.FILES[name][:2]
        return os.path.join(self.root, folder, id_ + ext)

    def needs(self):  # the files each sample must have
        return ('image',) + self.tasks

    def check(self, workers=0, rank=0, world=1):  # read this process's share of the samples once (Part II)
        check_samples(self, workers, rank, world)


class NYUD(_MultiTaskDataset):
    """NYUD-v2 in the ATRC / InvPT layout of NYUDv2.tar.gz (DOWNLOAD_HELP); also the synthetic scenes."""
    dataset, SIZE, SPLITS, IMAGES = 'nyud', (448, 576), 'gt_sets', ('images', '.png')
    FILES = {
        'semseg': ('segmentation', '.png',  # 1..40 -> 0..39; void 0 - 1 wraps to 255
                   lambda p, s: (_labels(p, 40).astype(np.int64) - 1).astype(np.uint8)),
        'depth': ('depth', '.npy', lambda p, s: _depth(p)),  # metres, 0 = invalid
        'normals': ('normals', '.png', lambda p, s: _normals(p)),  # 2 v / 255 - 1
        'edge': ('edge', '.png',  # stored 0 / 255; the reference trains on > 127
                 lambda p, s: edge_target(_grey(p, 'edge'), s.split, lambda m: (m > 127).astype(np.uint8)))}


class PASCALContext(_MultiTaskDataset):
    """PASCAL-Context in the ATRC / InvPT layout of PASCALContext.tar.gz (DOWNLOAD_HELP)."""
    dataset, SIZE, SPLITS, IMAGES = 'pascal', (512, 512), 'ImageSets/Context', ('JPEGImages', '.jpg')
    FILES = {  # s.labelmap: the sample's LabelMap (459 context classes), read once
        'semseg': ('semseg/VOC12', '.png', lambda p, s: _labels(p, 20, void=IGNORE_INDEX)),  # 255 = void
        'human_parts': ('human_parts', '.mat', lambda p, s: _person_parts(p, s)),  # unscored without a person
        'sal': ('sal_distill', '.png',  # 0..255 -> {0, 1}
                lambda p, s: (_grey(p, 'saliency').astype(np.float32) / 255.0 > 0.5).astype(np.uint8)),
        'normals': ('normals_distill', '.png',  # kept on the context classes NYU has too, else 0 = invalid
                    lambda p, s: np.where(np.isin(s.labelmap, PASCAL_NORMAL_CLASSES)[..., None], _normals(p),
                                          0).astype(np.float32)),
        'edge': ('pascal-context/trainval', '.mat', lambda p, s: edge_target(s.labelmap, s.split, labelmap_edges))}

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        # as published: boundaries scored on SEISM's test_new subset of val, human parts on the images with a person
        self.edge_ids = EDGE_TEST_NEW & set(self.ids) if self.split == 'val' and 'edge' in self.tasks else set()
        if self.edge_ids:
            self.subsets['edge'] = f'test_new: {len(self.edge_ids)} of {len(self.ids)} val images'
        if 'human_parts' in self.tasks:
            self.subsets['human_parts'] = 'the images with a person'

    def shared(self, id_, shape):
        s = super().shared(id_, shape)
        if self.edge_ids and id_ not in self.edge_ids:
            s.unscored.append('edge')
        if 'edge' in self.tasks or 'normals' in self.tasks:
            s.labelmap = _labelmap(self.path('labelmap', id_), shape)
        return s

    def path(self, name, id_):
        p = super().path('edge' if name == 'labelmap' else name, id_)  # (the LabelMap is the edges' file)
        if name == 'semseg' and not os.path.isfile(p):  # VOC12's masks where they exist, else Context's
            p = os.path.join(self.root, 'semseg', 'pascal-context', id_ + '.png')
        return p

    def needs(self):
        return super().needs() + (('labelmap',) if 'normals' in self.tasks else ())


# ---- The training augmentations of the reference recipe (TaskPrompter data/transforms.py) --------


def random_scale(sample, rng, lo=0.5, hi=2.0):
    """Resize everything by one s ~ U(lo, hi) to int(h s) x int(w s), as the reference RandomScaling: the image
    bilinear without antialiasing (OpenCV's INTER_LINEAR), float32, not rounded; the targets nearest."""
    s = rng.uniform(lo, hi)
    h0, w0 = sample['image'].shape[:2]
    h, w = max(1, int(h0 * s)), max(1, int(w0 * s))
    out = {}
    for k, a in sample.items():
        if k == 'image':
            x = torch.from_numpy(np.ascontiguousarray(a, np.float32)).permute(2, 0, 1)[None]  # (1, 3, h0, w0)
            out[k] = F.interpolate(x, size=(h, w), mode='bilinear', align_corners=False)[0].permute(1, 2, 0).numpy()
        elif TASK_TABLE[k].kind == 'depth':  # the scene looks s times closer
            out[k] = _nearest(a, h, w) / np.float32(s)
        else:
            out[k] = _nearest(a, h, w)
    return out


def random_crop(sample, size, rng, max_ratio=0.75, tries=10):
    """Crop a window of min(image, size), as the reference RandomCrop (mmseg's cat_max_ratio): drawn again, up
    to `tries` times, while one class holds max_ratio or more of the balancing task's labels (semseg)."""
    h0, w0 = sample['image'].shape[:2]
    h, w = min(h0, size[0]), min(w0, size[1])
    guide = [t for t in sample if t != 'image' and TASK_TABLE[t].balances_crop]
    for k in range(tries + 1):
        y, x = rng.integers(0, h0 - h + 1), rng.integers(0, w0 - w + 1)
        if k == tries or not guide:
            break
        labels = sample[guide[0]][y:y + h, x:x + w]
        counts = np.bincount(labels[labels != IGNORE_INDEX].ravel())
        counts = counts[counts > 0]
        if len(counts) > 1 and counts.max() < max_ratio * counts.sum():
            break
    return {k: a[y:y + h, x:x + w] for k, a in sample.items()}


def hflip(sample):
    """Mirror everything left-right; a mirrored normal points the other way in x."""
    out = {k: a[:, ::-1] for k, a in sample.items()}
    for k in [k for k in out if k != 'image' and TASK_TABLE[k].kind == 'normals']:
        out[k] = out[k] * np.array([-1, 1, 1], np.float32)
    return out


def photometric(image, rng):
    """The reference PhotoMetricDistortion (mmseg's) on the RGB image -> float32 0..255. Each step has p = 0.5
    and ends in uint8: brightness + U(-32, 32); contrast x U(0.5, 1.5), first or last; saturation x U(0.5, 1.5);
    hue + d, d in -18..17 OpenCV units of 2 deg. HSV is PIL's (docs/results.md, 'The photometric jitter
    against OpenCV's')."""
    x = _convert(image)

    def contrast(x):
        return _convert(x, alpha=rng.uniform(0.5, 1.5)) if rng.random() < 0.5 else x
    if rng.random() < 0.5:
        x = _convert(x, beta=rng.uniform(-32, 32))
    contrast_first = rng.random() < 0.5
    if contrast_first:
        x = contrast(x)
    if rng.random() < 0.5:
        x = _hsv_step(x, 1, lambda v: _convert(v, alpha=rng.uniform(0.5, 1.5)))
    if rng.random() < 0.5:
        shift = rng.integers(-18, 18) * 2 * 255 / 360  # in PIL's hue units
        x = _hsv_step(x, 0, lambda v: np.round(v + shift).astype(np.int64) % 255)
    if not contrast_first:
        x = contrast(x)
    return x.astype(np.float32)


def augment(sample, size, rng):
    """The reference training transforms: scale, crop, flip, photometric jitter -> (sample, its (h, w))."""
    sample = random_crop(random_scale(sample, rng), size, rng)
    if rng.random() < 0.5:
        sample = hflip(sample)
    # a crop without a foreground pixel (no person, or one cropped away) says nothing about parts: all void,
    # as the published transforms do (InvPT data/transforms.py, AddIgnoreRegions)
    for t in [t for t in sample if t != 'image' and TASK_TABLE[t].needs_foreground]:
        if not ((sample[t] > 0) & (sample[t] < 255)).any():
            sample[t] = np.full_like(sample[t], 255)
    sample['image'] = photometric(sample['image'], rng)
    return sample, sample['image'].shape[:2]


def to_tensors(sample, size):
    """Normalise the image (taskexpert.normalise), pad everything at the bottom and right to `size` -> the
    contract's tensors. Padding: image 0 (the mean colour), labels 255, depth and normals 0 (invalid)."""
    h, w = sample['image'].shape[:2]
    out = {}
    for k, a in sample.items():
        if k == 'image':
            x = normalise(torch.from_numpy(np.ascontiguousarray(np.asarray(a).transpose(2, 0, 1))))
            out[k] = F.pad(x, (0, size[1] - w, 0, size[0] - h))  # (3, H, W)
            continue
        kind, a = TASK_TABLE[k].kind, np.asarray(a)
        pad = ((0, size[0] - h), (0, size[1] - w)) + ((0, 0),) * (a.ndim - 2)
        if kind == 'classes':
            out[k] = torch.from_numpy(np.pad(a, pad, constant_values=IGNORE_INDEX).astype(np.int64))  # (H, W)
        elif kind in ('binary', 'depth'):  # (1, H, W)
            a = np.pad(a, pad, constant_values=IGNORE_INDEX if kind == 'binary' else 0)
            out[k] = torch.from_numpy(np.ascontiguousarray(a, np.float32))[None]
        elif kind == 'normals':  # (3, H, W)
            out[k] = torch.from_numpy(np.ascontiguousarray(np.pad(a, pad).transpose(2, 0, 1), np.float32))
        else:
            raise unknown_kind(k, 'padding')
    return out


# ---- Batching and loaders ------------------------------------------------------------------------


def collate(samples):
    """Stack every tensor along a new dim 0; 'meta' stays a list of dicts."""
    batch = {k: torch.stack([s[k] for s in samples]) for k in samples[0] if k != 'meta'}
    batch['meta'] = [s['meta'] for s in samples]
    return batch


def train_loader(dataset, global_batch, *, rank, world, seed, start, stop, workers):
    """The training stream of steps start..stop-1 for process `rank` of `world`. Step s is batch s % per_epoch
    of epoch s // per_epoch, in an order drawn from (seed, epoch) (StepBatches); sample i of epoch e is
    augmented with an rng drawn from (seed, e, i) (SeededSamples). So a resumed run reads what an
    uninterrupted one would, with or without worker processes."""
    return torch.utils.data.DataLoader(
        SeededSamples(dataset, seed), batch_sampler=StepBatches(len(dataset), global_batch, rank=rank, world=world,
                                                                seed=seed, start=start, stop=stop),
        num_workers=workers, collate_fn=collate, pin_memory=torch.cuda.is_available(),
        generator=torch.Generator().manual_seed(seed))  # its worker seeds: never drawn from the global RNG


def eval_loader(dataset, batch_size, workers):
    """`dataset` (not augmented) in order, every item once; its workers persist between evaluations."""
    return torch.utils.data.DataLoader(
        dataset, batch_size=batch_size, num_workers=workers, collate_fn=collate, pin_memory=torch.cuda.is_available(),
        persistent_workers=workers > 0, generator=torch.Generator())  # (as above: the global RNG untouched)


# ---- The meters, as the benchmarks score (docs/evaluation.md) ----------------------------------------
# Each follows the evaluation code the NYUD-v2 / PASCAL-Context literature shares (MTI-Net -> ATRC ->
# InvPT / TaskPrompter; SEISM for boundaries). A task's main metric is TASK_TABLE[task].metric.


class Meter:
    """A metric over a split. Its state, the tensors named in SUMS, are sums over images: the shards of a split
    add up (all-reduce with SUM). It lives on the predictions' device; score() reads it once."""
    SUMS = ()

    def state(self):  # the sums, in a fixed order (every process all-reduces the same list)
        return [getattr(self, k) for k in self.SUMS]

    def update(self, pred, target):
        """Add the raw predictions of an image (C, h, w) or a batch (B, C, h, w) and their targets."""
        pred, target = _batched(pred, target)  # (B, C, h, w), (B, C', h, w), on the predictions' device
        _move(self, pred.device)
        self.add(pred, target)


class SegMeter(Meter):
    """Semantic segmentation and human parts: one confusion matrix over the split (255 ignored). As the
    reference, IoU_c = TP / max(TP + FP + FN, 1e-8) and mIoU is the mean over ALL classes (one absent from
    both GT and prediction scores 0). 'class_IoU': each class's IoU by its name (CLASS_NAMES)."""
    SUMS = ('conf',)

    def __init__(self, names):
        self.names, self.num_classes = tuple(names), len(names)
        self.conf = torch.zeros(len(names), len(names), dtype=torch.int64)  # (gt, pred)

    def update(self, pred, target):
        _check_labels(target, self.num_classes)  # where the loader gives it (the CPU): no wait on the device
        super().update(pred, target)

    def add(self, pred, target):
        label = pred.max(dim=1).indices  # (B, h, w): the first best class, as argmax (max is faster on CPUs)
        target = target.reshape(label.shape).long()
        C = self.num_classes
        idx = torch.where(target != IGNORE_INDEX, target * C + label, C * C)  # void pixels: a spare bin
        self.conf += _count(idx, C * C + 1)[:C * C].reshape(C, C)

    def score(self):
        _move(self, 'cpu')
        conf = self.conf.double()
        tp = conf.diag()
        iou = tp / (conf.sum(0) + conf.sum(1) - tp).clamp(min=1e-8)
        return {'mIoU': 100 * iou.mean().item(), 'pixAcc': 100 * (tp.sum() / conf.sum().clamp(min=1)).item(),
                'class_IoU': dict(zip(self.names, (100 * iou).tolist()))}


class DepthMeter(Meter):
    """Depth over the valid pixels of the split: rmse = sqrt(sum sq err / n valid), log_rmse, abs_rel. As
    the reference, predictions <= 0 count as 1e-9 (for the log; in rmse and abs_rel too)."""
    SUMS = ('sq', 'log_sq', 'abs_rel', 'n')

    def __init__(self):
        self.sq, self.log_sq, self.abs_rel, self.n = (torch.zeros((), dtype=d) for d in [torch.float64] * 3 + [torch.int64])

    def add(self, pred, target):
        valid = depth_valid(target.reshape(pred.shape))
        p = pred.double().clamp(min=1e-9)
        g = torch.where(valid, target.reshape(pred.shape).double(), 1.0)  # 1 where invalid: finite log, ratio
        self.sq += torch.where(valid, (p - g) ** 2, 0).sum()
        self.log_sq += torch.where(valid, (p.log() - g.log()) ** 2, 0).sum()
        self.abs_rel += torch.where(valid, (p - g).abs() / g, 0).sum()
        self.n += valid.sum()

    def score(self):
        _move(self, 'cpu')
        n = max(self.n.item(), 1)
        return {'rmse': (self.sq.item() / n) ** 0.5, 'log_rmse': (self.log_sq.item() / n) ** 0.5,
                'abs_rel': self.abs_rel.item() / n}


class NormalsMeter(Meter):
    """Angular error (degrees) of the unit prediction: mean, rmse, median (of a histogram of 0.01-deg bins:
    +-0.005 deg), and % under 11.25 / 22.5 / 30 deg (reference eval_normals), over every non-zero GT vector
    as the reference counts (decode_normals). 'strict_mean': over plausible unit GT normals alone."""
    BIN = 0.01  # degrees
    THRESHOLDS = (11.25, 22.5, 30.0)
    SUMS = ('hist', 'sum', 'sum_sq', 'below', 'n', 'strict_sum', 'strict_n')

    def __init__(self):
        self.hist = torch.zeros(int(round(180 / self.BIN)), dtype=torch.int64)
        self.below = torch.zeros(len(self.THRESHOLDS), dtype=torch.int64)
        self.sum, self.sum_sq, self.strict_sum = (torch.zeros((), dtype=torch.float64) for _ in range(3))
        self.n, self.strict_n = torch.zeros((), dtype=torch.int64), torch.zeros((), dtype=torch.int64)

    def add(self, pred, target):
        err, g_sq = _angular_error(pred, target)  # (B, h, w) degrees, |g|^2
        valid = g_sq > 0  # not the zero vector (normals_valid, without its slower any())
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
        _move(self, 'cpu')
        n = max(self.n.item(), 1)
        out = {'mean': self.sum.item() / n, 'rmse': (self.sum_sq.item() / n) ** 0.5,
               'median': _hist_median(self.hist, self.n.item(), self.BIN)}
        out.update({f'{t:g}': 100 * b / n for t, b in zip(self.THRESHOLDS, self.below.tolist())})
        out['strict_mean'] = self.strict_sum.item() / max(self.strict_n.item(), 1)
        return out


class SaliencyMeter(Meter):
    """Saliency maxF (beta^2 = 0.3) over thresholds 0.05, 0.10, ..., 0.95, counts summed over the split, as
    the reference SaliencyMeter. Its quirk is kept, for comparable numbers: it applies a sigmoid to
    probabilities, so the score is sigmoid(sigmoid(logit)), in [0.5, 0.731]: only 0.55 .. 0.70 discriminate."""
    SUMS = ('tp', 'pred_pos', 'gt_pos')

    def __init__(self, beta_sq=0.3):
        self.beta_sq = beta_sq
        self.thresholds = torch.arange(0.05, 1, 0.05)  # float32, as the reference
        self.tp, self.pred_pos = (torch.zeros(len(self.thresholds), dtype=torch.int64) for _ in range(2))
        self.gt_pos = torch.zeros((), dtype=torch.int64)

    def add(self, pred, target):
        valid = (target != IGNORE_INDEX).reshape(-1, 1)
        score = torch.sigmoid(torch.sigmoid(pred.float())).reshape(-1, 1)  # the double sigmoid, see above
        gt = (target == 1).reshape(-1, 1)
        above = (score >= self.thresholds) & valid  # (N, thresholds)
        self.tp += (above & gt).sum(0)
        self.pred_pos += above.sum(0)
        self.gt_pos += (gt & valid).sum()

    def score(self):
        _move(self, 'cpu')
        tp, pred_pos, gt_pos = self.tp.double(), self.pred_pos.double(), self.gt_pos.double()
        prec, rec = tp / pred_pos, tp / gt_pos
        f = (1 + self.beta_sq) * prec * rec / (self.beta_sq * prec + rec)
        return {'maxF': 100 * torch.nan_to_num(f, nan=0.0).max().item()}


class EdgeMeter(Meter):
    """Boundary ODS / OIS F-measure (%) as SEISM computes it (_edge_counts: NMS, thinning, matching within
    max_dist x the diagonal) on the saved PNGs' 8-bit maps, image by image; with a pool, in its workers."""
    SUMS = ('counts', 'ois')

    def __init__(self, max_dist, pool=None):
        self.max_dist, self.pool, self.pending = max_dist, pool or _HERE, collections.deque()  # futures of counts
        self.counts = torch.zeros(len(EDGE_THRESHOLDS), 4, dtype=torch.int64)  # per threshold, summed over images
        self.ois = torch.zeros(4, dtype=torch.int64)  # each image at its own best threshold, summed

    def update(self, pred, target):
        pred = pred.detach()[None] if pred.dim() == 3 else pred.detach()
        levels = probability_levels(pred[:, 0]).cpu().numpy()  # (B, h, w) uint8: each map's one copy to the host
        target = target.detach().cpu().reshape(levels.shape).to(torch.uint8).numpy()
        for p, t in zip(levels, target):
            self.pending.append(self.pool.submit(_edge_job, p, t, self.max_dist))
            while len(self.pending) > 2 * self.pool.workers:  # a bounded backlog
                self.add(self.pending.popleft().result())

    def add(self, counts):
        self.counts += torch.from_numpy(counts)
        self.ois += torch.from_numpy(counts[np.argmax(_f_measure(counts))])

    def state(self):
        while self.pending:
            self.add(self.pending.popleft().result())
        return super().state()

    def score(self):
        counts, ois = (x.numpy() for x in self.state())
        f = _f_measure(counts)
        return {'odsF': 100 * float(f.max()), 'oisF': 100 * float(_f_measure(ois)),
                'odsT': float(EDGE_THRESHOLDS[f.argmax()])}  # odsT: the ODS threshold


# TASK_TABLE's meter column -> the meter of a task: (task, dataset, pool) -> Meter
METERS = {'segmentation': lambda task, dataset, pool: SegMeter(CLASS_NAMES[TASK_SET[dataset]][task]),
          'depth': lambda task, dataset, pool: DepthMeter(), 'normals': lambda task, dataset, pool: NormalsMeter(),
          'saliency': lambda task, dataset, pool: SaliencyMeter(),
          'boundary': lambda task, dataset, pool: EdgeMeter(EDGE_MAX_DIST[dataset], pool)}


def make_meters(tasks, dataset, pool=None):
    """task -> its meter (METERS), for `tasks` (names, or a dict's keys). pool: an EdgePool to score
    boundaries in, or None to score them here."""
    return {task: METERS[TASK_TABLE[task].meter](task, dataset, pool) for task in _scored_tasks(tasks, dataset)}


def update_meters(meters, outputs, batch):
    """Feed one batch to `meters` (make_meters), image by image: each cropped to its content (crops), each
    task unless the image's meta lists it 'unscored'. outputs: task -> raw predictions (B, C, H, W)."""
    for meta, preds, targets in crops(outputs, batch):
        # boundaries first: with a pool, its workers score them while the other meters run here
        for t, meter in sorted(meters.items(), key=lambda item: TASK_TABLE[item[0]].meter != 'boundary'):
            if t not in meta['unscored']:
                meter.update(preds[t], targets[t])


# Part II: the machinery: file checks, class tables, probing, SEISM's internals, prediction files, synthetic rooms


def crops(outputs, batch):
    """Each image of a batch cut to its content (meta['size']), as the benchmarks score and save it ->
    (meta, outputs task -> (1, C, h, w), the batch's tensors -> (1, ..., h, w)), image by image."""
    for i, meta in enumerate(batch['meta']):
        h, w = meta['size']
        yield (meta, {t: o[i:i + 1, :, :h, :w] for t, o in outputs.items()},
               {k: v[i:i + 1, ..., :h, :w] for k, v in batch.items() if k != 'meta'})


class DataError(FileNotFoundError, ValueError):
    """A dataset folder, split file or sample file that is missing or unreadable (one-line message)."""


def _progress(done, n, what):
    """'what: done/n' on stderr, rewritten in place about 100 times in all (so a log file gets few lines)."""
    if done % max(1, n // 100) == 0 or done == n:
        print(f'\r{what}: {done}/{n}', end='\n' if done == n else '', file=sys.stderr, flush=True)


_SEE_README = "get the dataset as described in README.md, section 'Datasets'"
DOWNLOAD_HELP = """\
Datasets (README.md, section 'Datasets'): the multi-task copies used by ATRC / InvPT,
  https://data.vision.ee.ethz.ch/brdavid/atrc/NYUDv2.tar.gz
  https://data.vision.ee.ethz.ch/brdavid/atrc/PASCALContext.tar.gz
(README.md lists mirrors on HKUST's SharePoint, should these be down.)
Extract with `tar xzf`, then pass the extracted folder as --data-root.
NYUD-v2 (NYUDv2.tar.gz, the multi-task copy used by ATRC / InvPT), 795 train / 654 val:
  NYUDv2/
    images/<id>.png            RGB, 425x560
    segmentation/<id>.png      0 = void, 1..40 = NYU-40 classes
    depth/<id>.npy             float metres, 0 = invalid
    normals/<id>.png           RGB, n = 2 * v / 255 - 1
    edge/<id>.png              0 / 255
    gt_sets/train.txt          one id a line (e.g. 0001)
    gt_sets/val.txt
PASCAL-Context (PASCALContext.tar.gz, the multi-task PASCAL_MT copy used by ATRC / InvPT),
4998 train / 5105 val:
  PASCALContext/
    JPEGImages/<id>.jpg                 e.g. 2008_000002.jpg
    ImageSets/Context/train.txt         one id a line
    ImageSets/Context/val.txt
    semseg/VOC12/<id>.png               21 classes, 255 = void (else semseg/pascal-context/<id>.png)
    pascal-context/trainval/<id>.mat    'LabelMap', 459 context classes (edges, normals mask)
    human_parts/<id>.mat                'anno' struct: objects with class, class_ind, mask, parts
    normals_distill/<id>.png            RGB, n = 2 * v / 255 - 1
    sal_distill/<id>.png                saliency 0..255
The synthetic scenes (data.make_synthetic) are written in the NYUD-v2 layout."""


# -------------------------------------------------------------------------------------------------
# Facts derived from the reference class tables (the db_info files of the InvPT PASCAL-Context reader)
# -------------------------------------------------------------------------------------------------

# NYU-40 class names; the id stored in segmentation/<id>.png is the index here + 1 (0 = void)
NYU40_CLASSES = (
    'wall', 'floor', 'cabinet', 'bed', 'chair', 'sofa', 'table', 'door', 'window', 'bookshelf',
    'picture', 'counter', 'blinds', 'desk', 'shelves', 'curtain', 'dresser', 'pillow', 'mirror',
    'floor mat', 'clothes', 'ceiling', 'books', 'refridgerator', 'television', 'paper', 'towel',
    'shower curtain', 'box', 'whiteboard', 'person', 'night stand', 'toilet', 'sink', 'lamp',
    'bathtub', 'bag', 'otherstructure', 'otherfurniture', 'otherprop')

# PASCAL-Context LabelMap ids whose distilled normals are kept: the 169 context classes whose name
# is also in the NYU class table (except 'unknown'), plus 'tvmonitor' (427), as the reference
# readers do. Every other LabelMap class gets normals 0 = invalid.
PASCAL_NORMAL_CLASSES = (
    3, 4, 6, 9, 10, 11, 13, 15, 17, 18, 22, 23, 29, 30, 33, 34, 36, 37, 38, 39, 41, 43, 46, 49,
    50, 51, 53, 55, 56, 59, 61, 62, 65, 66, 68, 69, 72, 73, 78, 83, 84, 85, 87, 88, 95, 96, 101,
    104, 105, 107, 111, 113, 115, 122, 124, 135, 141, 142, 143, 146, 150, 154, 157, 158, 159,
    165, 172, 174, 181, 183, 184, 191, 193, 195, 197, 199, 202, 213, 215, 216, 219, 220, 223,
    225, 228, 230, 232, 233, 238, 239, 242, 243, 246, 250, 251, 252, 255, 260, 261, 263, 269,
    272, 273, 275, 281, 283, 284, 285, 286, 287, 288, 290, 291, 292, 293, 295, 304, 307, 309,
    310, 314, 315, 319, 323, 329, 330, 331, 336, 342, 345, 349, 350, 351, 352, 355, 357, 368,
    370, 371, 374, 379, 380, 383, 384, 397, 401, 403, 405, 407, 408, 411, 412, 413, 414, 417,
    419, 421, 423, 427, 429, 430, 432, 440, 441, 442, 443, 444, 446, 454, 457)

PERSON_CLASS = 15  # VOC class index of 'person' in human_parts/<id>.mat
# PASCAL-Part person part names -> the 6 human-part groups (0 = background)
HUMAN_PART_GROUPS = {
    'hair': 1, 'head': 1, 'lear': 1, 'rear': 1, 'lebrow': 1, 'rebrow': 1, 'leye': 1, 'reye': 1,
    'nose': 1, 'mouth': 1,                                       # head
    'neck': 2, 'torso': 2,                                       # torso
    'luarm': 3, 'ruarm': 3,                                      # upper arms
    'llarm': 4, 'rlarm': 4, 'lhand': 4, 'rhand': 4,              # lower arms and hands
    'luleg': 5, 'ruleg': 5,                                      # upper legs
    'llleg': 6, 'rlleg': 6, 'lfoot': 6, 'rfoot': 6}              # lower legs and feet

# PASCAL-Context's 21 semantic classes (VOC's 20 and the background) and the 6 human-part groups
# (the InvPT / ATRC PASCAL reader's), in class-id order
VOC_CLASSES = (
    'background', 'aeroplane', 'bicycle', 'bird', 'boat', 'bottle', 'bus', 'car', 'cat', 'chair', 'cow',
    'diningtable', 'dog', 'horse', 'motorbike', 'person', 'pottedplant', 'sheep', 'sofa', 'train', 'tvmonitor')
HUMAN_PARTS = ('background', 'head', 'torso', 'upper arms', 'lower arms and hands', 'upper legs',
               'lower legs and feet')
CLASS_NAMES = {'nyud': {'semseg': NYU40_CLASSES}, 'pascal': {'semseg': VOC_CLASSES, 'human_parts': HUMAN_PARTS}}


# -------------------------------------------------------------------------------------------------
# Reading files: every failure becomes a DataError naming the file
# -------------------------------------------------------------------------------------------------


def _read(path, load):
    try:
        return load(path)
    except Exception as e:  # PIL, numpy and scipy raise many types for a damaged file
        raise DataError(f'{path}: cannot read it ({type(e).__name__}: {e}); re-extract it or '
                        f'{_SEE_README}') from e


def _png(path, mode=None, modes=()):
    """An image file -> (its PIL mode, its values: as stored, or converted to `mode` when its own mode is
    one of `modes`, else None)."""
    def load(p):
        with Image.open(p) as im:
            if mode is None:
                return im.mode, np.array(im)
            return im.mode, np.array(im.convert(mode)) if im.mode in modes else None
    return _read(path, load)


def _image(path):
    """An image -> (uint8 (h, w, 3) RGB, [(path, the conversion it took)], empty if none: a sample's
    meta 'read_as'). The modes taken are predict's (taskexpert.RGB_READS); 16-bit or float ones refused."""
    mode, rgb = _png(path, 'RGB', RGB_READS)
    if rgb is None:
        raise DataError(f'{path}: an image of PIL mode {mode} (16-bit, float, CMYK...); the readers take 8-bit RGB, '
                        'greyscale or palette images: convert it to 8-bit RGB')
    return rgb, [(path, RGB_READS[mode])] * (RGB_READS[mode] is not None)


def _labels(path, top, void=None):
    """A class-index PNG (one channel, 8 or 16 bits; a palette image's indices) -> uint8 (h, w), every
    value in 0..top or `void`. A colour label image (a visualisation) cannot be read back: refused."""
    mode, a = _png(path)
    if a.ndim != 2:
        raise DataError(f'{path}: a label image of PIL mode {mode}; labels are one-channel PNGs of class indices, '
                        'not colours')
    bad = (a > top) & (a != void) if void is not None else a > top
    if bad.any():
        value = int(a[bad][0])
        why = f'{void} = void' if void is not None else f'0 = void, 1..{top} the classes' + (
            f'; a map of 0..{top - 1} with 255 as void?' if value == 255 else '')
        raise DataError(f'{path}: label {value} outside 0..{top} ({why})')
    return a.astype(np.uint8)


def _grey(path, what):
    """A one-channel map of 0..255 levels (edges 0 / 255, saliency) -> uint8 (h, w), stored as greyscale,
    1-bit, palette or RGB(A) of three equal channels. A colour image, or a map of 0 / 1 alone (read as
    all-negative), is refused."""
    mode, rgb = _png(path, 'RGB', ('L', 'LA', '1', 'P', 'PA', 'RGB', 'RGBA'))
    if rgb is None or (rgb[..., 1:] != rgb[..., :1]).any():
        raise DataError(f'{path}: {"a colour image" if rgb is not None else "an image of PIL mode " + mode}; {what} '
                        'maps are one-channel 8-bit PNGs of 0..255')
    if rgb.max() == 1:
        raise DataError(f'{path}: holds 0 / 1 alone; the dataset stores {what} maps as 0 / 255: multiply it by 255')
    return rgb[..., 0]


def _normals(path):
    """normals/<id>.png -> float32 (h, w, 3) (decode_normals); an RGBA file's alpha is dropped."""
    mode, a = _png(path, 'RGB', ('RGB', 'RGBA'))
    if a is None:
        raise DataError(f'{path}: an image of PIL mode {mode}; normals are RGB PNGs, n = 2 v / 255 - 1')
    return decode_normals(a)


MAX_DEPTH = 80.0  # metres: the reference's depth meter counts 0 < depth < 80 (TaskPrompter eval_depth.py)


def _depth(path):
    """depth/<id>.npy -> float32 (h, w) metres, 0 = invalid (so are NaN, inf and negative values). An
    integer map (millimetres?), depths beyond MAX_DEPTH, an .npz archive or a map of another shape are
    refused."""
    a = _read(path, lambda p: np.load(p, allow_pickle=False))
    if not isinstance(a, np.ndarray):
        raise DataError(f'{path}: an .npz archive; depth maps are single .npy arrays (numpy.save)')
    if a.dtype.kind != 'f':
        raise DataError(f'{path}: depth of dtype {a.dtype}; depth maps hold metres as floats (millimetres? / 1000)')
    if a.ndim == 3 and 1 in (a.shape[0], a.shape[2]):
        a = a.reshape(a.shape[:2] if a.shape[2] == 1 else a.shape[1:])
    if a.ndim != 2:
        raise DataError(f'{path}: depth of shape {a.shape}; one (h, w) map of metres is expected')
    a = a.astype(np.float32)
    a[~np.isfinite(a) | (a < 0)] = 0  # 0 = invalid
    if a.max() >= MAX_DEPTH:
        raise DataError(f'{path}: depth up to {a.max():.4g}; depth maps hold metres (millimetres? / 1000)')
    return a


def _mat(path, key):
    m = _read(path, scipy.io.loadmat)
    if key not in m:
        raise DataError(f'{path}: has no {key!r} variable; re-extract it or {_SEE_README}')
    return m[key]


def _labelmap(path, shape):
    """pascal-context/trainval/<id>.mat -> its 'LabelMap' (h, w) of context class ids, the image's shape."""
    labelmap = _mat(path, 'LabelMap')
    if labelmap.ndim != 2 or labelmap.dtype.kind not in 'iuf':  # (MATLAB may save class ids as doubles)
        raise DataError(f'{path}: LabelMap of shape {labelmap.shape} and dtype {labelmap.dtype}; '
                        'one (h, w) map of context class ids is expected')
    _check_shape(path, labelmap, shape)
    return labelmap


def _read_split(path):
    """A split file: UTF-8 text (a byte-order mark allowed), one id a line, each once -> the ids."""
    if not os.path.isfile(path):
        raise DataError(f'{path}: split file not found; {_SEE_README}')
    try:
        text = _read(path, lambda p: open(p, 'rb').read()).decode('utf-8-sig')
    except UnicodeDecodeError as e:
        raise DataError(f'{path}: not UTF-8 text (byte {e.start}); a split file lists one id a line') from None
    ids = [line.strip() for line in text.splitlines() if line.strip()]
    if not ids:
        raise DataError(f'{path}: split file lists no ids; {_SEE_README}')
    if twice := [i for i, n in collections.Counter(ids).items() if n > 1]:
        raise DataError(f'{path}: id {twice[0]} is listed twice; list each id once')
    return ids


def _check_files(paths, split_file):
    missing = [p for p in paths if not os.path.isfile(p)]
    if missing:
        raise DataError(f'{missing[0]}: file not found ({len(missing)} of the {len(paths)} files '
                        f'needed by {split_file} are missing); {_SEE_README}')


def _check_shape(path, a, shape):
    if a.shape[:2] != shape:
        raise DataError(f'{path}: size {a.shape[:2]} differs from its image {shape}; re-extract it '
                        f'or {_SEE_README}')


# -------------------------------------------------------------------------------------------------
# Label decoding
# -------------------------------------------------------------------------------------------------


def decode_normals(rgb):
    """uint8 (h, w, 3) -> float32 (h, w, 3) n = 2 v / 255 - 1, not renormalised, no pixel dropped.

    This is what the published pipeline decodes and compares with (github.com/prismformore/
    Multi-Task-Transformer, InvPT: data/nyud.py decodes 2 v / 255 - 1; losses/loss_functions.py L1Loss
    takes it as the target of the unit prediction; data/transforms.py AddIgnoreRegions ignores only
    vectors of length 0; evaluation/eval_normals.py counts every other pixel). So pixels stored black
    (0, 0, 0) count as -(1, 1, 1) / sqrt(3) and grey (128, 128, 128) as +(1, 1, 1) / sqrt(3) once
    normalised. An 8-bit file never decodes to the zero vector, which marks padding and PASCAL's
    masked classes (invalid). NormalsMeter also reports the error over plausible unit normals alone
    ('strict_mean')."""
    return 2.0 * rgb[..., :3].astype(np.float32) / 255.0 - 1.0  # (float32 stays float32)


_LAPLACE = np.array([[0, 1, 0], [1, -4, 1], [0, 1, 0]], np.float64)


def labelmap_edges(labelmap):
    """PASCAL's training edge target: thin(|Laplacian(LabelMap)| > 0) (h, w) uint8 {0, 1}. The
    Laplacian is OpenCV's default 3x3 one with reflect-101 borders (scipy 'mirror'), as in the
    reference. On the val split edge_target gives SEISM's boundary instead (gt_boundary)."""
    lap = scipy.ndimage.convolve(labelmap.astype(np.float64), _LAPLACE, mode='mirror')
    return thin(np.abs(lap) > 0).astype(np.uint8)


def human_parts_from_anno(path, shape):
    """human_parts/<id>.mat -> (parts uint8 (h, w) 0 = background, 1..6, has_human bool). The
    `anno` struct holds `objects` (class, class_ind, mask, parts); each part has part_name, mask.
    Only person objects (class_ind 15) that carry parts are drawn, as in the reference."""
    anno = _mat(path, 'anno')
    target = np.zeros(shape, np.uint8)
    try:  # a struct of another layout fails here as a KeyError, IndexError, ValueError, ...
        persons = [o['parts'] for o in anno[0, 0]['objects'].ravel()
                   if int(np.asarray(o['class_ind']).ravel()[0]) == PERSON_CLASS and o['parts'].size]
        parts = [(str(np.asarray(p['part_name']).ravel()[0]), np.asarray(p['mask']).astype(bool))
                 for person in persons for p in person.ravel()]
    except Exception as e:
        raise DataError(f'{path}: not a PASCAL-Part annotation ({type(e).__name__}: {e}); {_SEE_README}') from None
    for name, mask in parts:
        if name not in HUMAN_PART_GROUPS:
            raise DataError(f'{path}: unknown person part {name!r}')
        if mask.ndim != 2:
            raise DataError(f'{path}: part mask of shape {mask.shape}; (h, w) masks are expected')
        _check_shape(path, mask, shape)
        target[mask] = HUMAN_PART_GROUPS[name]
    return target, bool(persons)


def _person_parts(path, s):
    """PASCALContext's human-parts decoder: the parts target; an image without a person is left unscored, as the
    reference's HumanPartsMeter scores only the images with one."""
    target, has_human = human_parts_from_anno(path, s.shape)
    if not has_human:
        s.unscored.append('human_parts')
    return target


# train.py's --dataset -> its reader (the synthetic scenes are written in the NYUD layout)
READERS = {'nyud': NYUD, 'pascal': PASCALContext, 'synthetic': NYUD}
# what each layout looks like, and its name in messages
LAYOUTS = {'synthetic': (('synthetic.json',), 'synthetic scenes (NYUD layout)'),
           'nyud': (('gt_sets', 'images'), 'NYUD-v2'), 'pascal': (('ImageSets', 'JPEGImages'), 'PASCAL-Context')}


def layout(root):
    """The dataset a folder holds, by the files at its top (LAYOUTS), or None."""
    return next((name for name, (files, _) in LAYOUTS.items()
                 if all(os.path.exists(os.path.join(root, f)) for f in files)), None)


# -------------------------------------------------------------------------------------------------
# Input checks, and probing a split before a run: each sample read once, a problem said in one line
# -------------------------------------------------------------------------------------------------


def _checked_tasks(reader, tasks, root):
    """A reader's tasks (all of its dataset's by default), each one it reads; its root, a folder."""
    known = TASKS[reader.dataset]
    tasks = tuple(known if tasks is None else tasks)
    if unknown := [t for t in tasks if t not in known]:
        raise ValueError(f'unknown {reader.dataset} task(s) {unknown}: choose from {", ".join(known)}')
    if unread := [t for t in tasks if t not in reader.FILES]:
        raise ValueError(f'{type(reader).__name__} has no reader for task {unread[0]!r}')
    if not os.path.isdir(root):
        raise DataError(f'{root}: dataset folder not found; {_SEE_README}')
    return tasks


def _check_fits(reader, i, h, w, most=None):
    """Without augmentation (whose crop fits any image to the network) an image is only padded: it must
    not be larger than the network size. most: the split's largest (h, w), for the advice."""
    if h > reader.size[0] or w > reader.size[1]:
        fit = [-(-max(x, s) // PATCH) * PATCH for x, s in zip(most or (h, w), reader.size)]
        raise DataError(f'{reader.path("image", reader.ids[i])}: image {h}x{w} is larger than the network size '
                        f'{reader.size[0]}x{reader.size[1]}; pass --img-size {fit[0]} {fit[1]} or larger')


def check_samples(reader, workers=0, rank=0, world=1):
    """Read every sample of a reader once (this process's share: every world-th from rank), as training and
    evaluation will. A damaged file, an out-of-range label, a map of the wrong size or an image larger than
    the network stops the run with one line (DataError) before its first step. Progress on stderr for 200+
    samples. Without augmentation the error names the largest image, so one --img-size fits them all."""
    share = range(rank, len(reader), world)
    loader = torch.utils.data.DataLoader(_Probe(reader), batch_size=None, sampler=share, num_workers=workers)
    most, too_large = (0, 0), None  # the largest height and width; (i, h, w) of a first image too large
    read_as = {}  # conversion -> (files, the first file)
    for done, (i, problem, (h, w), conversions) in enumerate(loader, 1):
        if problem:
            raise DataError(problem)
        most = max(most[0], h), max(most[1], w)
        if too_large is None and (h > reader.size[0] or w > reader.size[1]):
            too_large = i, h, w
        for path, how in conversions:
            n, first = read_as.get(how, (0, path))
            read_as[how] = n + 1, first
        if rank == 0 and len(share) >= 200:
            _progress(done, len(share), f'checking {reader.split} ({reader.root})')
    if too_large and not reader.train:
        _check_fits(reader, *too_large, most=most)
    for how, (n, first) in read_as.items() if rank == 0 else ():  # each conversion said once
        print(f'note: {n} image(s) of {reader.root} {reader.split}: {how} (e.g. {first})', file=sys.stderr)


class _Probe(torch.utils.data.Dataset):
    """Sample i of a reader -> (i, the problem with it or '', its (h, w), the conversions its files took).
    A problem comes back as a value, not an exception, so that one read in a worker process stays one line."""

    def __init__(self, reader):
        self.reader = reader

    def __getitem__(self, i):
        try:
            _, meta = self.reader.load(i)
        except DataError as e:
            return i, str(e), (0, 0), []
        return i, '', meta['size'], meta['read_as']


# -------------------------------------------------------------------------------------------------
# The training stream as a function of (seed, step): what a resumed run replays
# -------------------------------------------------------------------------------------------------


class StepBatches(torch.utils.data.Sampler):
    """One process's batches of steps start..stop-1. Step s is batch s % per_epoch of epoch s // per_epoch,
    in an order drawn from (seed, epoch); each process reads its slice of the global batch. Items are
    (index, epoch), so that each sample's augmentation can be seeded."""

    def __init__(self, n, global_batch, *, rank, world, seed, start, stop):
        self.n, self.gb, self.rank, self.world = n, global_batch, rank, world
        self.seed, self.start, self.stop = seed, start, stop
        self.per_epoch = n // global_batch  # full batches only

    def __len__(self):
        return self.stop - self.start

    def __iter__(self):
        b = self.gb // self.world
        epoch, perm = None, None
        for s in range(self.start, self.stop):
            e, j = divmod(s, self.per_epoch)
            if e != epoch:
                epoch, perm = e, np.random.default_rng([self.seed, e]).permutation(self.n)
            chunk = perm[j * self.gb + self.rank * b: j * self.gb + (self.rank + 1) * b]
            yield [(int(i), e) for i in chunk]


class SeededSamples(torch.utils.data.Dataset):
    """Item (i, epoch) of a training dataset, augmented with the rng drawn from (seed, epoch, i)."""

    def __init__(self, dataset, seed):
        self.dataset, self.seed = dataset, seed

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, key):
        i, epoch = key
        self.dataset.rng = np.random.default_rng([self.seed, epoch, i, 1])  # 1: not the order's seed
        return self.dataset[i]


# -------------------------------------------------------------------------------------------------
# The steps of the augmentations and the meters
# -------------------------------------------------------------------------------------------------


def _nearest(a, h, w):
    """Nearest-neighbour resize of (h0, w0[, C]) to (h, w) as OpenCV's INTER_NEAREST, which the reference
    resizes labels with: source pixel floor(i * h0 / h) (not pixel-centre aligned)."""
    rows = np.minimum((np.arange(h) * a.shape[0] / h).astype(np.int64), a.shape[0] - 1)
    cols = np.minimum((np.arange(w) * a.shape[1] / w).astype(np.int64), a.shape[1] - 1)
    return a[rows[:, None], cols]


def _convert(x, alpha=1.0, beta=0.0):
    """x alpha + beta, clipped to 0..255 and truncated to uint8, as each step of the reference does."""
    return np.clip(x.astype(np.float32) * alpha + beta, 0, 255).astype(np.uint8)


def _hsv_step(x, channel, change):
    """RGB uint8 (h, w, 3) -> HSV, change(channel values) -> RGB uint8; PIL's HSV (hue 0..255 for 360 deg)."""
    hsv = np.array(Image.fromarray(x).convert('HSV'))
    hsv[..., channel] = change(hsv[..., channel])
    return np.asarray(Image.fromarray(hsv, 'HSV').convert('RGB'))


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


def _scored_tasks(tasks, dataset):
    """make_meters' tasks as a list, each a row of the task table with a meter of METERS; its dataset checked."""
    tasks = list(tasks)
    if dataset not in EDGE_MAX_DIST:
        raise ValueError(f'make_meters: unknown dataset {dataset!r}; expected one of {sorted(EDGE_MAX_DIST)}')
    for task in tasks:
        if task not in TASK_TABLE:
            raise ValueError(f'make_meters: unknown task {task!r}; known: {sorted(TASK_TABLE)}')
        if TASK_TABLE[task].meter not in METERS:
            raise ValueError(f'task {task!r}: no meter {TASK_TABLE[task].meter!r}')
    return tasks


def _move(meter, device):
    """Move a meter's tensors to `device`."""
    for k, v in vars(meter).items():
        if isinstance(v, torch.Tensor):
            setattr(meter, k, v.to(device))


def _check_labels(target, num_classes):
    if ((target != IGNORE_INDEX) & ((target < 0) | (target >= num_classes))).any():
        raise ValueError(f'SegMeter: target labels must be in [0, {num_classes}) or {IGNORE_INDEX}')


def _angular_error(pred, target):
    """The angle (degrees) between the unit prediction and the unit GT, per pixel (B, h, w), and |GT|^2."""
    # float32 on the 3 component planes (B, h, w) at a time: faster on a CPU than float64 over
    # (B, 3, h, w), within 1e-5 deg of it; the meter accumulates the sums in float64
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
    return torch.atan2(diff_sq.sqrt_(), sum_sq.sqrt_()).mul_(360 / math.pi), g_sq


def _hist_median(hist, total, width):
    """The median of `total` values counted in a histogram of bins `width` wide, each read at its bin centre:
    as np.median, the mean of the values of rank (n-1)//2 and n//2 (0-based)."""
    ranks = torch.tensor([(total - 1) // 2, total // 2])
    return ((torch.searchsorted(torch.cumsum(hist, 0), ranks, right=True).double() + 0.5) * width).mean().item()


class _Here:
    """An EdgeMeter's pool when none is given: each image scored at once, here (no workers: no backlog)."""
    workers = 0

    @staticmethod
    def submit(fn, *args):
        done = concurrent.futures.Future()
        done.set_result(fn(*args))
        return done


_HERE = _Here()


# ---- boundary detection: ODS / OIS F-measure as SEISM computes it (no MATLAB) ---------------------
# Pipeline per image, as SEISM scores the 8-bit PNGs the reference saves (InvPT's README and
# prismformore/Boundary-Detection-Evaluation-Tools: SEISM's read_one_cont_png, eval_method, Dollar's
# edgesEvalImg): the map the PNG holds (probability_levels / 255), edge NMS of it as read_one_cont_png
# does (Dollar's edgesNmsMex with the orientation of edgesDetect), for each of 101 thresholds
# binarise (> t) and thin to 1-px lines (MATLAB bwmorph 'thin'), then match one-to-one to the GT
# boundary pixels (gt_boundary: SEISM's, which the val readers give as the edge target) within
# max_dist * image diagonal (BSDS correspondPixels), counting matched / total predicted and
# matched / total GT pixels. ODS: counts summed over the split per threshold, best F.
# OIS: each image at its own best threshold, counts summed, F. Thinning dominates the cost for the
# flat maps of an untrained model (every threshold's map is nearly the whole image; see
# _thin_lanes), the exact matchings for sharper maps (docs/results.md, 'What an evaluation costs').

def probability_levels(logit):
    """Logits (any shape) -> uint8 255 sigmoid(logit), truncated as numpy's astype(np.uint8) truncates:
    the 8-bit map the reference writes per image as edge/<id>.png and sal/<id>.png (InvPT
    evaluation/evaluate_utils.py, save_model_pred_for_one_task), hence what SEISM scores."""
    return (255 * logit.float().sigmoid()).to(torch.uint8)


# 0.001, 0.01, 0.02, ..., 0.99, 0.999: SEISM's 101 thresholds
EDGE_THRESHOLDS = np.concatenate([[0.001], np.arange(1, 100) / 100, [0.999]])


def _conv_tri(img, r):
    """Dollar's convTri for an integer radius r: separable triangle filter [1 .. r+1 .. 1] / (r+1)^2
    ([1 2 1] / 4 for r = 1) with 'symmetric' borders (scipy's 'reflect')."""
    f = np.concatenate([np.arange(1, r + 2), np.arange(r, 0, -1)]) / (r + 1) ** 2
    rows = scipy.ndimage.correlate1d(img, f, axis=0, mode='reflect')
    return scipy.ndimage.correlate1d(rows, f, axis=1, mode='reflect')


def _edge_nms(E, r=1, s=5, m=1.01):
    """Non-maximum suppression of an edge map E (H, W) as SEISM's read_one_cont_png does it with
    Dollar's toolbox: the orientation of edgesDetect (second derivatives of convTri(E, 4)), then
    edgesNmsMex(E, O, r=1, s=5, m=1.01): a pixel survives if m * E is not below the bilinearly
    interpolated E at +-1..r px along the normal; the s-px image border is faded linearly (x / s).
    (The BSDS scripts of HED / RCF smooth E with convTri(E, 1) first; SEISM reads the PNG as is.)"""
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

    The maps of a flat prediction (an untrained model's) are the whole image less 0-4 fading border
    rings; each is peeled ring by ring for hundreds of sub-iterations. Lane k starts two
    sub-iterations later per ring it lacks against lane 0 (area difference / lane 0's border), so
    the lanes' fronts coincide and one look at a front pixel serves them all. Each lane still runs
    exactly its own sequence of sub-iterations (it starts at an even one), hence its exact result."""
    h, w = level.shape
    S, first, first_lanes, lanes_at = _thin_start(level, K)
    W = w + 2
    off = np.array([dr * W + dc for dr, dc in _NEIGHBOURS])
    check = [first[:0]] * 2  # pixels to look at in sub-iteration 0 / 1
    slot = np.zeros(len(S), np.int64)  # scratch to drop repeated neighbours
    active = S.dtype.type(0)
    quiet, it = 0, 0
    while it <= max(lanes_at) or quiet < 2:  # two sub-iterations in a row without deletion: converged
        s = it % 2
        if it in lanes_at:  # these lanes begin: look at their border pixels in both sub-iterations
            active |= lanes_at[it]
            add = first[(first_lanes & lanes_at[it]) != 0]
            check = [np.concatenate([c, add]) for c in check]
            quiet = 0
        pix, check[s] = check[s], first[:0]
        pix, dead = _deletions(S, pix, off, _G3_FIRST[s], active)
        if len(pix):
            S[pix] &= ~dead
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


def _thin_start(level, K):
    """The start of _thin_lanes: S, the zero-padded words (flat, (H + 2) (W + 2)); the border pixels
    (flat indices) and their lanes, the only pixels a lane can delete in its first sub-iterations;
    and the sub-iteration -> the lanes that begin there."""
    h, w = level.shape
    word = np.uint32 if K <= 32 else np.uint64  # half the memory traffic when the lanes fit
    bits = np.array([(1 << k) - 1 for k in range(K + 1)], word)  # level l -> lanes 0..l-1
    S = np.zeros((h + 2, w + 2), word)
    S[1:-1, 1:-1] = bits[np.minimum(level, K)]
    inner = S[1:-1, 1:-1].copy()
    for dr, dc in _NEIGHBOURS:
        inner &= S[1 + dr:h + 1 + dr, 1 + dc:w + 1 + dc]
    border = S.copy()
    border[1:-1, 1:-1] &= ~inner  # lanes in which the pixel has an 'off' neighbour
    S, border = S.ravel(), border.ravel()
    first = np.flatnonzero(border)
    first_lanes = border[first]
    size = np.bincount(np.minimum(level, K).ravel(), minlength=K + 1)[::-1].cumsum()[::-1][1:]  # (K,) lane sizes
    rings = (size[0] - size) / max(1, np.count_nonzero(first_lanes & word(1)))
    start = 2 * np.minimum(_FADE_RINGS, np.rint(rings)).astype(int)
    lanes_at = {t: np.bitwise_or.reduce(bits[1:][start == t] - bits[:-1][start == t]) for t in set(start.tolist())}
    return S, first, first_lanes, lanes_at


def _deletions(S, pix, off, order, active):
    """One sub-iteration's test G1-G3 at the pixels pix (flat indices into S) -> (the pixels where some
    active lane deletes, their lanes to delete). order: the neighbours as _G3_FIRST gives them."""
    g3 = S[off[order[:4], None] + pix]  # (4, n): x1 x2 x3 x8, or x5 x6 x7 x4
    ok = S[pix] & active & ~((g3[1] | g3[2] | ~g3[3]) & g3[0])  # on and G3, per lane
    keep = np.flatnonzero(ok)
    pix, ok = pix[keep], ok[keep]
    x = np.empty((9, len(pix)), S.dtype)  # x1..x8, x9 = x1
    x[order[:4]] = g3[:, keep]
    x[order[4:]] = S[off[order[4:], None] + pix]
    x[8] = x[0]
    odd, even = x[0:8:2], x[1:9:2]  # x_{2k-1}, x_{2k} for k = 1..4
    z = np.empty((3, 4, len(pix)), S.dtype)
    np.bitwise_or(odd, even, out=z[0])  # n1 counts these
    np.bitwise_or(even, x[2:9:2], out=z[1])  # n2 counts these
    np.bitwise_and(z[1], ~odd, out=z[2])  # X_H counts these
    two = _at_least_two(z)  # (3, n)
    g1 = np.bitwise_or.reduce(z[2], axis=0) & ~two[2]  # X_H = 1
    g2 = two[0] & two[1] & ~(np.bitwise_and.reduce(z[0], axis=0) & np.bitwise_and.reduce(z[1], axis=0))
    dead = ok & g1 & g2
    hit = np.flatnonzero(dead)
    return pix[hit], dead[hit]


def thin(mask):
    """bwmorph(mask, 'thin', Inf) of a bool image (H, W)."""
    return _thin_lanes(np.asarray(mask, np.int64), 1) != 0


def seg2bmap(labels):
    """The region borders of a label image (H, W) (any integer or bool dtype) -> bool (H, W), as SEISM's
    misc/seg2bmap.m (jponttuset/seism, D. Martin's BSDS code) draws them at the image's own size: a
    pixel is marked when its label differs from its east, south or south-east neighbour's; in the last
    row only the east one is compared, in the last column only the south one, and the bottom-right
    pixel is never marked. Every border is thus marked once, on its top / left side (the .m file: "offset
    by 1/2 pixel towards the origin"): a 1-px line of other labels gives 2 px, a 2-px line two lines."""
    seg = np.asarray(labels)
    b = np.zeros(seg.shape, bool)
    b[:, :-1] = seg[:, :-1] != seg[:, 1:]  # east (the last column has none)
    b[:-1] |= seg[:-1] != seg[1:]  # south (the last row has none)
    b[:-1, :-1] |= seg[:-1, :-1] != seg[1:, 1:]  # south-east (neither has one)
    return b


def gt_boundary(labels):
    """The ground-truth boundary SEISM scores against, from the ground-truth image that its
    gt_wrappers/db_gt.m reads (NYUD: edge/<id>.png, its stored values read as labels; PASCAL-Context:
    the LabelMap): bwmorph(seg2bmap(G), 'thin', Inf) as piotr_edges/edgesEvalImg.m builds it ->
    uint8 (H, W) {0, 1}. (db_gt first renumbers PASCAL's LabelMap into its 4-connected regions,
    misc/relabel.m. That changes no mark: 4-neighbours with one label share a region, and a south-east
    neighbour with the pixel's label in another region means that the east one has another label.)"""
    return thin(seg2bmap(labels)).astype(np.uint8)


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
    can miss it and find slightly fewer matches; docs/evaluation.md, 'Metrics as the papers count them'.)
    One-to-one, so matched predicted = matched GT. GT boundary = the pixels where target == 1, as they
    are: the val readers give SEISM's boundary (gt_boundary), already thinned as SEISM thins it;
    255 pixels (padding) count neither as GT nor as prediction."""
    valid = target != IGNORE_INDEX
    gr, gc = np.nonzero(target == 1)
    lane_of, K, words, pr, pc = _thresholded_and_thinned(_edge_nms(prob) * valid)
    p, g = _pairs_within(pr, pc, gr, gc, prob.shape, max_dist * np.hypot(*prob.shape))
    counts = np.zeros((len(EDGE_THRESHOLDS), 4), np.int64)
    counts[:, 3] = len(gr)
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


def _thresholded_and_thinned(nms):
    """Every binarised map nms > t of the thresholds, thinned at once. Only the distinct maps are
    lanes: the map changes at threshold j only if some value lies in (t_j-1, t_j]. -> (lane_of:
    threshold j -> its lane, K lanes (lane K: the empty map), words: lane i's bit per predicted pixel,
    in groups of 64 lanes; pr, pc: the predicted pixels kept at some threshold)."""
    level = np.searchsorted(EDGE_THRESHOLDS, nms, side='left')  # (H, W) in 0..101: thresholds below
    present = np.bincount(level.ravel(), minlength=len(EDGE_THRESHOLDS) + 1) > 0
    present[0] = False
    rank = np.cumsum(present)  # level -> number of lanes holding its pixels; lane i = {rank > i}
    lane_of = rank[:-1]  # threshold j: the map {level > j} = the lane after rank[j] (K: empty)
    K, rank = rank[-1], rank[level]
    thinned = [_thin_lanes(np.clip(rank - g, 0, 64), min(64, K - g)) for g in range(0, K, 64)]
    pr, pc = np.nonzero(np.any([t != 0 for t in thinned], axis=0))
    return lane_of, K, [t[pr, pc] for t in thinned], pr, pc


def _pairs_within(pr, pc, gr, gc, shape, radius):
    """All (predicted, GT) pixel pairs within radius, as index arrays (p, g) sorted by predicted then
    GT pixel; found once per image, each threshold keeps the pairs of its surviving pixels."""
    h, w = shape
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
    return p[order], g[order]


def _f_measure(counts):
    """F of (..., 4) counts [matched pred, pred, matched GT, GT]; 0 where precision or recall is
    undefined or both are 0 (SEISM's conventions)."""
    counts = np.asarray(counts, np.float64)
    prec = np.divide(counts[..., 0], counts[..., 1], out=np.zeros(counts.shape[:-1]), where=counts[..., 1] > 0)
    rec = np.divide(counts[..., 2], counts[..., 3], out=np.zeros(counts.shape[:-1]), where=counts[..., 3] > 0)
    return np.divide(2 * prec * rec, prec + rec, out=np.zeros_like(prec), where=prec + rec > 0)


def _edge_job(levels, target, max_dist):
    """One image's boundary counts (see _edge_counts) from its 8-bit map (H, W) uint8 (see
    probability_levels), read as SEISM reads the PNG: levels / 255; what a worker of an EdgePool runs."""
    return _edge_counts(levels / 255.0, target, max_dist)


class EdgePool(concurrent.futures.ProcessPoolExecutor):
    """Worker processes that score boundaries while the model runs on the next batches. Spawned (not
    forked): safe beside CUDA and threads. Shut it down (or use it in a `with`) when done."""

    def __init__(self, workers):
        super().__init__(workers, mp_context=multiprocessing.get_context('spawn'), initializer=_edge_worker,
                         initargs=(os.getpid(),))
        self.workers = workers

    def start(self):
        """Start every worker now, in the background (a spawned worker takes seconds to import torch;
        otherwise they start at the first image). Returns futures that are done once they run."""
        return [self.submit(int) for _ in range(self.workers)]

    def stop(self):
        """End the workers now, mid-image (an interrupted run has no use for their counts); shut it down after."""
        for process in list(self._processes.values()):  # (ProcessPoolExecutor has no public way before 3.14)
            process.terminate()


def _edge_worker(parent):
    """A boundary worker's start: one thread (the workers together hold the cores); Ctrl-C and a closed
    terminal left to the training process `parent` (its pid), which stops the workers itself
    (EdgePool.stop), without a traceback each; and a watchdog that ends the worker once that process
    is gone, however it ended (SIGKILL, the OOM killer): nothing else would, as the worker holds its
    own end of the pool's queues. multiprocessing's resource tracker ends with the last of them."""
    import threading, time  # (a worker's own)
    torch.set_num_threads(1)
    for signum in (signal.SIGINT, signal.SIGHUP):
        signal.signal(signum, signal.SIG_IGN)

    def watchdog():
        while os.getppid() == parent:  # (an orphan is adopted by another process)
            time.sleep(1)
        os._exit(1)
    threading.Thread(target=watchdog, daemon=True).start()




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


EDGE_TEST_NEW = _decode_ids(_TEST_NEW)  # the val images whose boundaries PASCAL-Context's papers score


# Boundary matching tolerance, as a fraction of the image diagonal (SEISM settings of the literature).
EDGE_MAX_DIST = {'nyud': 0.011, 'synthetic': 0.011, 'pascal': 0.0075}


def write_predictions(folder, outputs, batch):
    """Write what the field's offline tools read, per image of a batch (cropped to its content) and
    task, into folder/<task>/<id>.<ext> as the reference saves its predictions (InvPT
    evaluation/evaluate_utils.py, save_model_pred_for_one_task; SEISM reads edge/): edge, sal: 8-bit
    PNG of probability_levels; semseg, human_parts: PNG of class indices (NYUD's 0..39: the
    segmentation file's id - 1, as InvPT saves them); normals: RGB PNG (n + 1) 255 / 2 truncated;
    depth: .mat with 'depth' (h, w) float32 metres, clamped at 0. Each file written atomically."""
    for meta, raw, _ in crops(outputs, batch):
        for task, x in postprocess(raw).items():
            kind, path = TASK_TABLE[task].kind, os.path.join(folder, task, meta['id'])
            os.makedirs(os.path.dirname(path), exist_ok=True)
            if kind == 'depth':
                mat = {'depth': x[0, 0].clamp(min=0).cpu().numpy()}  # (h, w)
                atomic_write(path + '.mat', lambda f: scipy.io.savemat(f, mat))
                continue
            if kind == 'binary':
                v = probability_levels(raw[task][0, 0])  # (h, w), the values the boundary metric scores
            elif kind == 'classes':
                v = x[0].to(torch.uint8)  # (h, w) class indices
            elif kind == 'normals':  # unit vectors (3, h, w) -> (h, w, 3) RGB
                v = ((x[0] + 1) * 255 / 2).to(torch.uint8).permute(1, 2, 0)
            else:
                raise unknown_kind(task, 'prediction file')
            write_png(path + '.png', v.cpu().numpy())


def write_png(path, image):
    """A PIL image or a uint8 array as a PNG file, written atomically (taskexpert.atomic_write)."""
    image = image if isinstance(image, Image.Image) else Image.fromarray(image)
    atomic_write(path, lambda f: image.save(f, format='PNG'))


def trivial_scores(loader, tasks, dataset):
    """The val scores of input-blind predictors, measured with the same meters: the majority class
    (semseg, human parts), the mean depth, the mean normal, all-edge and all-salient. Two passes:
    statistics of the val labels, then the constant predictions."""
    kinds = {t: TASK_TABLE[t].kind for t in tasks}
    counts = {t: torch.zeros(c) for t, c in tasks.items() if kinds[t] == 'classes'}  # pixels per class
    depth = {t: (0.0, 0) for t in tasks if kinds[t] == 'depth'}  # the valid depths' sum, their number
    normal = {t: torch.zeros(3) for t in tasks if kinds[t] == 'normals'}  # the vectors' sum
    for batch in loader:
        for t in counts:
            y = batch[t][batch[t] != IGNORE_INDEX]
            counts[t] += torch.bincount(y, minlength=len(counts[t]))[:len(counts[t])].float()
        for t in depth:
            d = batch[t][batch[t] > 0]
            depth[t] = depth[t][0] + d.sum().item(), depth[t][1] + d.numel()
        for t in normal:
            normal[t] += batch[t].sum((0, 2, 3))  # invalid normals are 0
    constant = {}  # task -> one image's prediction (C, 1, 1)
    for t, c in tasks.items():
        kind = kinds[t]
        if kind == 'classes':  # one-hot logits of the majority class
            constant[t] = F.one_hot(counts[t].argmax(), c).float()[:, None, None]
        elif kind == 'depth':
            constant[t] = torch.full((1, 1, 1), depth[t][0] / max(depth[t][1], 1))
        elif kind == 'normals':
            constant[t] = F.normalize(normal[t], dim=0)[:, None, None]
        elif kind == 'binary':  # a logit of 10 everywhere, i.e. all positive
            constant[t] = torch.full((1, 1, 1), 10.0)
        else:
            raise unknown_kind(t, 'input-blind predictor')
    meters = make_meters(tasks, dataset)
    for batch in loader:
        B, _, H, W = batch['image'].shape
        update_meters(meters, {t: x[None].expand(B, -1, H, W) for t, x in constant.items()}, batch)
    return {t: m.score() for t, m in meters.items()}


def delta_m(results, baselines):
    """Multi-task gain Delta_m (%) over single-task baselines (Maninis et al. 2019, as the literature
    reports it): mean over tasks of (-1)^l_t (M_t - M_single_t) / M_single_t * 100, l_t = 1 when lower
    is better. results, baselines: task -> main metric value (TASK_TABLE[task].metric)."""
    missing = [t for t in results if t not in baselines]
    if missing:
        raise ValueError(f'delta_m: no baseline for task(s) {missing}')
    gains = [(1 if TASK_TABLE[t].higher else -1) * (results[t] - baselines[t]) / baselines[t] * 100 for t in results]
    return sum(gains) / len(gains)


# -------------------------------------------------------------------------------------------------
# Synthetic indoor scenes in the NYUD layout (docs/datasets.md, 'The synthetic rooms')
# A room is the inside of an axis-aligned box (world y up, metres); furniture are boxes with a yaw;
# one ray per pixel is cast with slab tests, vectorised over pixels (one box at a time).
# -------------------------------------------------------------------------------------------------

GENERATOR_VERSION = 4  # bump when the scenes change, so cached folders are regenerated
NYUD_INTRINSICS = (518.8, 519.5, 325.6, 253.7, 640, 480)  # fx, fy, cx, cy at width x height

# look per class: texture kind, base RGB (None = random hue per scene), colour jitter
_LOOKS = {
    'wall': ('plain', None, 0.0), 'ceiling': ('plain', (0.92, 0.91, 0.88), 0.03),
    'cabinet': ('wood', (0.55, 0.38, 0.22), 0.12), 'bed': ('fabric', (0.85, 0.82, 0.78), 0.15),
    'chair': ('wood', (0.35, 0.22, 0.12), 0.1), 'sofa': ('fabric', (0.45, 0.25, 0.2), 0.2),
    'table': ('wood', (0.6, 0.42, 0.25), 0.1), 'door': ('wood', (0.7, 0.55, 0.38), 0.1),
    'window': ('window', (0.75, 0.85, 1.0), 0.05), 'bookshelf': ('wood', (0.3, 0.2, 0.12), 0.08),
    'picture': ('picture', (0.5, 0.5, 0.5), 0.2), 'counter': ('tiles', (0.8, 0.78, 0.72), 0.1),
    'blinds': ('hstripes', (0.9, 0.88, 0.82), 0.05), 'desk': ('wood', (0.5, 0.35, 0.2), 0.1),
    'shelves': ('wood', (0.65, 0.5, 0.33), 0.1), 'curtain': ('fabric', (0.6, 0.2, 0.25), 0.2),
    'dresser': ('wood', (0.45, 0.3, 0.18), 0.1), 'pillow': ('fabric', (0.9, 0.88, 0.8), 0.15),
    'mirror': ('plain', (0.78, 0.82, 0.86), 0.04), 'floor mat': ('fabric', (0.55, 0.3, 0.2), 0.2),
    'refridgerator': ('plain', (0.9, 0.9, 0.9), 0.05), 'television': ('plain', (0.06, 0.06, 0.07), 0.02),
    'box': ('plain', (0.7, 0.55, 0.35), 0.06), 'whiteboard': ('plain', (0.97, 0.97, 0.97), 0.02),
    'night stand': ('wood', (0.5, 0.33, 0.2), 0.1), 'toilet': ('plain', (0.95, 0.95, 0.95), 0.02),
    'sink': ('plain', (0.92, 0.92, 0.94), 0.03), 'lamp': ('plain', (1.0, 0.92, 0.7), 0.05),
    'bathtub': ('plain', (0.95, 0.95, 0.96), 0.02), 'books': ('vstripes', (0.5, 0.3, 0.3), 0.3),
    'bag': ('fabric', (0.3, 0.3, 0.35), 0.2), 'otherfurniture': ('wood', (0.5, 0.4, 0.3), 0.2),
    'otherprop': ('plain', None, 0.0)}
_FLOORS = (('wood', (0.6, 0.42, 0.26)), ('tiles', (0.75, 0.73, 0.7)), ('fabric', (0.45, 0.42, 0.4)))

# standing on the floor: name -> (width, height, depth) ranges in metres, and a draw weight
_FLOOR_ITEMS = {
    'cabinet': (((0.5, 1.2), (0.8, 2.0), (0.4, 0.6)), 2), 'bed': (((1.0, 2.0), (0.4, 0.6), (1.9, 2.2)), 1),
    'chair': (((0.4, 0.6), (0.8, 1.0), (0.4, 0.6)), 3), 'sofa': (((1.5, 2.4), (0.7, 0.9), (0.8, 1.0)), 1.5),
    'table': (((0.8, 1.8), (0.7, 0.78), (0.6, 1.0)), 2), 'bookshelf': (((0.6, 1.2), (1.5, 2.2), (0.25, 0.4)), 1),
    'counter': (((1.2, 3.0), (0.85, 0.95), (0.55, 0.65)), 1), 'desk': (((1.0, 1.6), (0.72, 0.76), (0.5, 0.8)), 1.5),
    'dresser': (((0.8, 1.4), (0.7, 1.1), (0.4, 0.55)), 1), 'refridgerator': (((0.6, 0.8), (1.6, 1.9), (0.6, 0.75)), 0.7),
    'night stand': (((0.4, 0.6), (0.5, 0.65), (0.35, 0.5)), 1), 'toilet': (((0.35, 0.45), (0.7, 0.8), (0.6, 0.7)), 0.5),
    'bathtub': (((1.5, 1.7), (0.5, 0.6), (0.7, 0.8)), 0.4), 'box': (((0.2, 0.6), (0.2, 0.5), (0.2, 0.6)), 1),
    'otherfurniture': (((0.4, 1.2), (0.4, 1.2), (0.4, 1.0)), 1)}
# on a wall: name -> (width, height, bottom height) ranges, thickness
_WALL_ITEMS = {
    'door': (((0.8, 0.95), (2.0, 2.1), (0.0, 0.0)), 0.04), 'window': (((0.8, 2.0), (1.0, 1.5), (0.8, 1.0)), 0.06),
    'picture': (((0.3, 1.0), (0.3, 0.8), (1.1, 1.6)), 0.03), 'whiteboard': (((1.2, 2.4), (0.9, 1.2), (0.9, 1.0)), 0.025),
    'mirror': (((0.4, 0.8), (0.6, 1.2), (0.9, 1.2)), 0.02), 'television': (((0.8, 1.3), (0.5, 0.75), (1.0, 1.4)), 0.08),
    'curtain': (((0.6, 1.5), (2.0, 2.3), (0.05, 0.2)), 0.1), 'blinds': (((0.8, 1.6), (0.9, 1.3), (0.9, 1.1)), 0.05),
    'shelves': (((0.6, 1.2), (0.25, 0.4), (1.2, 1.6)), 0.25)}
# on top of another item: name -> size ranges, the classes it may stand on
_TOP_ITEMS = {
    'pillow': (((0.4, 0.6), (0.1, 0.18), (0.3, 0.45)), ('bed', 'sofa')),
    'lamp': (((0.2, 0.35), (0.3, 0.6), (0.2, 0.35)), ('night stand', 'desk', 'dresser', 'table')),
    'books': (((0.15, 0.35), (0.1, 0.3), (0.15, 0.25)), ('table', 'desk', 'dresser', 'bookshelf', 'cabinet')),
    'sink': (((0.4, 0.6), (0.12, 0.2), (0.35, 0.45)), ('counter',)),
    'television': (((0.6, 1.0), (0.4, 0.6), (0.06, 0.1)), ('dresser', 'cabinet')),
    'otherprop': (((0.1, 0.3), (0.1, 0.35), (0.1, 0.3)), ('table', 'desk', 'counter', 'dresser')),
    'bag': (((0.25, 0.4), (0.2, 0.4), (0.15, 0.25)), ('bed', 'sofa', 'chair'))}


def _cls(name):
    return NYU40_CLASSES.index(name) + 1


def _rot_y(yaw):
    c, s = np.cos(yaw), np.sin(yaw)
    return np.array([[c, 0, s], [0, 1, 0], [-s, 0, c]])


def _layout(rng):
    """Random room (W, H, D) and furniture boxes: list of dict(cls, centre (3,), yaw, half (3,))."""
    room = np.array([rng.uniform(3.0, 6.5), rng.uniform(2.4, 3.2), rng.uniform(3.0, 7.0)])
    # walls as (yaw of an item facing into the room, point on the wall at the origin of its width axis)
    walls = [(np.pi / 2, lambda a: (0.0, a)), (-np.pi / 2, lambda a: (room[0], a)),
             (0.0, lambda a: (a, 0.0)), (np.pi, lambda a: (a, room[2]))]
    wall_len = (room[2], room[2], room[0], room[0])
    boxes = []
    _floor_items(rng, room, walls, wall_len, boxes)
    _top_items(rng, boxes)
    _wall_items(rng, walls, wall_len, boxes)
    if rng.random() < 0.3:
        size = (rng.uniform(0.8, 2.5), rng.uniform(0.01, 0.02), rng.uniform(0.6, 1.8))
        _box(boxes, 'floor mat', (rng.uniform(1, room[0] - 1), size[1] / 2, rng.uniform(1, room[2] - 1)),
             rng.uniform(0, np.pi), size)
    return room, boxes


def _box(boxes, name, centre, yaw, size):
    boxes.append(dict(cls=_cls(name), centre=np.asarray(centre, float), yaw=yaw, half=np.asarray(size) / 2))


def _floor_items(rng, room, walls, wall_len, boxes):
    """3-8 items standing on the floor, against a wall or free-standing, not piled into each other."""
    names = list(_FLOOR_ITEMS)
    weights = np.array([_FLOOR_ITEMS[n][1] for n in names])
    footprints = []  # (x, z, radius) of the floor items
    for _ in range(rng.integers(3, 9)):
        name = names[rng.choice(len(names), p=weights / weights.sum())]
        size = [rng.uniform(*r) for r in _FLOOR_ITEMS[name][0]]
        radius = 0.5 * np.hypot(size[0], size[2])
        for _ in range(20):
            if rng.random() < 0.6:  # against a wall, facing into the room
                k = rng.integers(4)
                yaw = walls[k][0] + rng.normal(0, 0.03)
                a = rng.uniform(size[0] / 2, max(size[0] / 2, wall_len[k] - size[0] / 2))
                x, z = walls[k][1](a)
                inward = _rot_y(yaw) @ np.array([0, 0, 1.0])
                x, z = x + inward[0] * (size[2] / 2 + 0.02), z + inward[2] * (size[2] / 2 + 0.02)
            else:  # free-standing at any yaw
                yaw = rng.uniform(0, 2 * np.pi)
                x, z = rng.uniform(radius, room[0] - radius), rng.uniform(radius, room[2] - radius)
            if all(np.hypot(x - fx, z - fz) > 0.8 * (radius + fr) for fx, fz, fr in footprints):
                footprints.append((x, z, radius))
                _box(boxes, name, (x, size[1] / 2, z), yaw, size)
                break


def _top_items(rng, boxes):
    """Small items on top of some of the furniture."""
    for parent in list(boxes):
        options = [n for n, (_, on) in _TOP_ITEMS.items() if NYU40_CLASSES[parent['cls'] - 1] in on]
        if not options or rng.random() < 0.4:
            continue
        name = options[rng.integers(len(options))]
        size = np.minimum([rng.uniform(*r) for r in _TOP_ITEMS[name][0]], 2 * parent['half'] * 0.9)
        local = [rng.uniform(-1, 1) * (parent['half'][i] - size[i] / 2) for i in (0, 2)]
        top = parent['centre'][1] + parent['half'][1]
        centre = parent['centre'] + _rot_y(parent['yaw']) @ np.array([local[0], 0, local[1]])
        _box(boxes, name, (centre[0], top + size[1] / 2, centre[2]), parent['yaw'] + rng.normal(0, 0.2), size)


def _wall_items(rng, walls, wall_len, boxes):
    """1-4 flat items on the walls; no two overlap (their fronts would be coplanar)."""
    placed = []  # (wall, a0, a1, y0, y1) of the wall items
    for _ in range(rng.integers(1, 5)):
        name = list(_WALL_ITEMS)[rng.integers(len(_WALL_ITEMS))]
        (wr, hr, br), thick = _WALL_ITEMS[name]
        k = rng.integers(4)
        w, h, b = rng.uniform(*wr), rng.uniform(*hr), rng.uniform(*br)
        if w > wall_len[k] - 0.2:
            continue
        a = rng.uniform(w / 2 + 0.1, wall_len[k] - w / 2 - 0.1)
        if any(pk == k and a - w / 2 < a1 and a + w / 2 > a0 and b < y1 and b + h > y0 for pk, a0, a1, y0, y1 in placed):
            continue
        placed.append((k, a - w / 2, a + w / 2, b, b + h))
        x, z = walls[k][1](a)
        inward = _rot_y(walls[k][0]) @ np.array([0, 0, 1.0])
        _box(boxes, name, (x + inward[0] * thick / 2, b + h / 2, z + inward[2] * thick / 2), walls[k][0], (w, h, thick))


def _camera(rng, room, boxes, tries=200):
    """Camera-to-world rotation (3, 3) (columns: right, down, forward, the OpenCV camera axes) and
    position (3,): inside the room, 0.6 m clear of every floor item, looking roughly at the room.
    Returns the boxes too, less any that no candidate position could keep clear of (rare)."""
    # a hand-held camera at chest height, as NYUD's Kinect: a near-constant height gives the image a
    # cue to the room's metric scale
    cand = rng.uniform([0.6, 1.25, 0.6], [room[0] - 0.6, 1.35, room[2] - 0.6], (tries, 3))
    blocked = np.zeros((tries, len(boxes)), bool)
    for k, b in enumerate(boxes):  # candidate in the box frame, (tries, 3)
        local = (cand - b['centre']) @ _rot_y(b['yaw'])
        blocked[:, k] = ((np.abs(local[:, 0]) < b['half'][0] + 0.6) & (np.abs(local[:, 2]) < b['half'][2] + 0.6)
                         & (b['centre'][1] - b['half'][1] < cand[:, 1] + 0.3))
    best = np.argmin(blocked.sum(1))
    pos = cand[best]
    boxes = [b for b, blocks in zip(boxes, blocked[best]) if not blocks]
    to_centre = room / 2 - pos
    yaw = np.arctan2(to_centre[0], to_centre[2]) + rng.uniform(-1.0, 1.0)
    pitch = rng.uniform(-0.45, 0.1)  # radians, negative looks down
    forward = np.array([np.sin(yaw) * np.cos(pitch), np.sin(pitch), np.cos(yaw) * np.cos(pitch)])
    right = np.cross(forward, [0, 1.0, 0])
    right /= np.linalg.norm(right)
    down = np.cross(forward, right)
    roll = rng.normal(0, 0.03)
    right, down = np.cos(roll) * right + np.sin(roll) * down, -np.sin(roll) * right + np.cos(roll) * down
    return np.stack([right, down, forward], 1), pos, boxes


def _cast(origin, dirs, room, boxes, t_max=None):
    """Nearest hit of the rays origin (3,) + t dirs (N, 3), t > 0.
    Returns t (N,); the surface hit (N,): 0 floor, 1 ceiling, 2..5 walls, 6 + k box k; its world
    normal (N, 3) facing the ray; the hit point in the surface's own frame (N, 3) (world for the
    room, box frame for a box) and the axis (N,) of the face hit in that frame, for texturing.
    With t_max (shadow rays) only boxes are tested (the room is convex, it shadows nothing) and
    only hits with t < t_max count; then only t and the surface are returned (others None).
    Inside, vectors are kept as (3, N) rows: numpy is slow at reducing over a short last axis."""
    n, dtype = len(dirs), dirs.dtype  # float32 throughout: half the memory traffic of float64
    origin, room = origin.astype(dtype), room.astype(dtype)
    dirs = np.ascontiguousarray(dirs.T)  # (3, N)
    unit = dirs / np.sqrt((dirs ** 2).sum(0))
    with np.errstate(divide='ignore', invalid='ignore'):
        if t_max is None:  # inside of the room box: the first wall plane each ray reaches
            t, face, up = np.full(n, np.inf, dtype), np.zeros(n, np.int64), np.zeros(n, bool)
            for a in range(3):
                ta = (np.where(dirs[a] > 0, room[a], 0) - origin[a]) / dirs[a]
                closer = (ta > 0) & (ta < t)
                t[closer], face[closer], up[closer] = ta[closer], a, dirs[a][closer] > 0
            # up: the ray leaves through the far side of that axis (ceiling, the x = W or z = D wall)
            inst = np.where(face == 1, up, np.where(face == 0, 2 + up, 4 + up)).astype(np.int64)
            normal = np.zeros((3, n), dtype)
            normal[face, np.arange(n)] = np.where(up, -1, 1)
            local = origin[:, None] + t * dirs
        else:
            t, inst, normal, local, face = np.full(n, t_max, dtype), np.full(n, -1), None, None, None
        for k, b in enumerate(boxes):
            centre, half = b['centre'].astype(dtype), b['half'].astype(dtype)
            # only rays within the cone of the box's bounding sphere can hit it: test just those
            to_box = centre - origin
            dist, radius = np.linalg.norm(to_box), np.linalg.norm(half)
            idx = np.flatnonzero(to_box @ unit > np.sqrt(max(dist ** 2 - radius ** 2, 0)) - 1e-6) if dist > radius else np.arange(n)
            # slab test in the box frame (world -> box frame: R^T x)
            rot = _rot_y(b['yaw']).astype(dtype)
            o, d = (origin - centre) @ rot, rot.T @ dirs[:, idx]  # (3,), (3, n)
            t_near, t_far = np.full(len(idx), -np.inf, dtype), np.full(len(idx), np.inf, dtype)
            f = np.zeros(len(idx), np.int64)
            for a in range(3):
                t1, t2 = (-half[a] - o[a]) / d[a], (half[a] - o[a]) / d[a]
                lo, hi = np.fmin(t1, t2), np.fmax(t1, t2)  # fmin / fmax skip the NaN of 0 / 0
                f[lo > t_near] = a
                t_near, t_far = np.fmax(t_near, lo), np.fmin(t_far, hi)
            hit = (t_near < t_far) & (t_near > 1e-6) & (t_near < t[idx])
            if not hit.any():
                continue
            idx, d, t_near, f = idx[hit], d[:, hit], t_near[hit], f[hit]
            t[idx] = t_near
            inst[idx] = 6 + k
            if normal is not None:
                n_local = np.zeros((3, len(idx)), dtype)
                n_local[f, np.arange(len(idx))] = -np.sign(d[f, np.arange(len(idx))])
                normal[:, idx] = rot @ n_local
                local[:, idx] = o[:, None] + t_near * d
                face[idx] = f
    if normal is None:
        return t, inst, None, None, None
    return t, inst, normal.T, local.T, face


# in-plane texture axes (u, v) of a face by the axis of its normal: x -> (z, y), y -> (x, z), z -> (x, y)
_UV_AXES = np.array([[2, 1], [0, 2], [0, 1]])


def _hash(i, j, salt):
    """Pseudo-random in [0, 1) per integer cell (i, j) (the usual shader sine hash)."""
    return np.modf(np.abs(np.sin(i * 127.1 + j * 311.7 + salt * 74.7) * 43758.5453))[0]


def _albedo(kind, colour, uv, rng):
    """RGB albedo (N, 3) of texture `kind` on surface coordinates uv (N, 2) in metres."""
    u, v = uv[:, 0], uv[:, 1]
    salt = rng.uniform(0, 100)
    if kind == 'wood':  # planks with per-plank tone and wavy grain
        pw = rng.uniform(0.08, 0.2)
        plank = np.floor(u / pw)
        tone = 0.8 + 0.35 * _hash(plank, 0, salt)
        grain = 1 + 0.06 * np.sin(2 * np.pi * (v * rng.uniform(4, 9) + 3 * _hash(plank, 1, salt)) + 2 * np.sin(u * 25))
        f = tone * grain * np.where(np.modf(u / pw)[0] < 0.05, 0.6, 1.0)
        return colour * f[:, None]
    if kind == 'tiles':  # checker of two tones with dark grout
        s = rng.uniform(0.25, 0.6)
        iu, iv = np.floor(u / s), np.floor(v / s)
        f = np.where((iu + iv) % 2 == 0, 1.0, rng.uniform(0.7, 0.9)) * (0.95 + 0.1 * _hash(iu, iv, salt))
        grout = (np.modf(u / s)[0] < 0.04) | (np.modf(v / s)[0] < 0.04)
        return colour * np.where(grout, 0.55, f)[:, None]
    if kind == 'fabric':  # fine weave noise
        cu, cv = np.floor(u / 0.012), np.floor(v / 0.012)
        f = (0.88 + 0.24 * _hash(cu, cv, salt)) * (1 + 0.05 * np.sin(u * 260) * np.sin(v * 260))
        return colour * f[:, None]
    if kind in ('hstripes', 'vstripes'):  # slats (blinds) or spines (books), each of its own tone
        w = rng.uniform(0.025, 0.06)
        idx = np.floor((v if kind == 'hstripes' else u) / w)
        tone = np.stack([_hash(idx, c, salt) for c in range(3)], 1)
        mix = 0.3 if kind == 'hstripes' else 0.8
        return colour * (1 - mix) + tone * mix * np.where(np.modf((v if kind == 'hstripes' else u) / w)[0] < 0.1, 0.5, 1.0)[:, None]
    if kind == 'picture':  # smooth colourful field
        k = rng.uniform(3, 12, (3, 2))
        p = rng.uniform(0, 2 * np.pi, 3)
        return 0.5 + 0.4 * np.sin(u[:, None] * k[:, 0] + v[:, None] * k[:, 1] + p)
    if kind == 'window':  # bright sky, brighter towards the top
        return colour * (1.1 + 0.3 * np.clip(v - v.min(), 0, 2))[:, None]
    cu, cv = np.floor(u / 0.25), np.floor(v / 0.25)  # plain: faint blotches
    return colour * (0.96 + 0.08 * _hash(cu, cv, salt))[:, None]


def _look(name, rng):
    kind, base, jitter = _LOOKS[name]
    if base is None:  # walls and props: any hue, walls pale
        sat, val = (rng.uniform(0.03, 0.3), rng.uniform(0.65, 0.95)) if name == 'wall' else (rng.uniform(0.3, 0.9), rng.uniform(0.3, 0.9))
        base = colorsys.hsv_to_rgb(rng.random(), sat, val)
    colour = np.clip(np.asarray(base) * rng.uniform(0.8, 1.15) + rng.normal(0, jitter, 3), 0.02, 1)
    return kind, colour


def render_scene(rng, size):
    """One random room seen from one random camera at `size` (h, w). Returns a dict of uint8 image
    (h, w, 3), labels uint8 (0 void, 1..40), depth float32 metres (0 invalid), normals float32
    (h, w, 3) in the camera frame (x right, y down, z forward, facing the camera), edge uint8 {0, 1}:
    the borders between surfaces (instances), 1 px wide as NYUD's edges drawn from its annotated
    segmentation (seg2bmap of the instance map)."""
    h, w = size
    fx, fy, cx, cy, w0, h0 = NYUD_INTRINSICS
    fx, cx, fy, cy = fx * w / w0, cx * w / w0, fy * h / h0, cy * h / h0
    room, boxes = _layout(rng)
    # pixel rays with z = 1 in the camera frame, so the ray parameter t is the depth (NYUD z-depth)
    vv, uu = np.mgrid[0:h, 0:w].astype(np.float32)
    rays = np.stack([(uu - cx) / fx, (vv - cy) / fy, np.ones_like(uu)], -1).reshape(-1, 3)
    for _ in range(10):  # re-draw the camera if it sees too few classes or too much out of range
        rot, pos, kept = _camera(rng, room, boxes)
        classes = np.array([_cls('floor'), _cls('ceiling')] + [_cls('wall')] * 4 + [b['cls'] for b in kept])
        dirs = rays @ np.ascontiguousarray(rot.T, np.float32)  # (N, 3) world
        t, inst, normal, local, face = _cast(pos, dirs, room, kept)
        valid = (t >= 0.5) & (t <= 10)
        if valid.mean() > 0.99 and np.count_nonzero(np.bincount(classes[inst])) >= 3:
            break
    boxes = kept
    # texture coordinates: the two in-plane axes of the hit face, in the surface's own frame
    uv = np.take_along_axis(local, _UV_AXES[face], 1)
    albedo = np.zeros((len(t), 3), np.float32)
    floor_kind, floor_colour = _FLOORS[rng.integers(len(_FLOORS))]
    for i in np.unique(inst):
        m = inst == i
        if i == 0:
            colour = np.clip(np.asarray(floor_colour) * rng.uniform(0.7, 1.2) + rng.normal(0, 0.05, 3), 0, 1)
            kind = floor_kind
        else:
            kind, colour = _look(NYU40_CLASSES[classes[i] - 1], rng)
        albedo[m] = _albedo(kind, colour, uv[m], rng)
    image = _lit(rng, albedo, pos=pos, t=t, dirs=dirs, normal=normal, room=room, boxes=boxes)
    depth = np.where(valid, t, 0).reshape(h, w).astype(np.float32)
    normals = (normal @ rot.astype(np.float32)).reshape(h, w, 3)  # world -> camera is R^T n
    return dict(image=image.reshape(h, w, 3).astype(np.uint8), labels=classes[inst].reshape(h, w).astype(np.uint8),
                depth=depth, normals=normals, edge=seg2bmap(inst.reshape(h, w)).astype(np.uint8),
                intrinsics=(fx, fy, cx, cy))


def _lit(rng, albedo, *, pos, t, dirs, normal, room, boxes):
    """The pixels' RGB 0-255 (N, 3) float32: ambient + Lambert from a lamp 10 cm above the lens (a
    flash, a head-mounted lamp), with box shadows, a near inverse-square fall-off, a tint and sensor
    noise. A light at the camera makes brightness fall with distance and with the surface's angle to
    the view: a depth and orientation cue a small model learns from scratch in minutes (docs/results.md,
    'The quick start')."""
    light = (pos + [0, 0.1, 0]).astype(np.float32)
    point = pos.astype(np.float32) + t[:, None] * dirs  # (N, 3) world
    to_light = light - point
    dist = np.linalg.norm(to_light, axis=1)
    lambert = np.clip(np.sum(normal * to_light, 1) / dist, 0, 1)
    # shadow rays, cast from the light towards each point (one origin, so the cone culling works)
    _, blocker, _, _, _ = _cast(light, -to_light, room, boxes, t_max=1 - 1e-4)
    lit = blocker < 0
    shade = rng.uniform(0.1, 0.2) + rng.uniform(1.0, 1.3) * lambert * lit / (1 + (dist / 2) ** 2)
    tint = 1 + rng.normal(0, 0.04, 3)
    noise = 2.5 * rng.standard_normal(albedo.shape, dtype=np.float32)  # sensor noise, in grey levels
    return np.clip((albedo * shade[:, None] * tint.astype(np.float32)) ** (1 / 1.2) * 255 + noise, 0, 255)


def make_synthetic(root, n_train=300, n_val=100, size=(240, 320), seed=0):
    """Write n_train + n_val random scenes to `root` in the NYUD layout (images/, segmentation/,
    depth/, normals/, edge/, gt_sets/{train,val}.txt), so NYUD(root, ...) reads them. Scene i is
    drawn from numpy's Generator seeded with (seed, i): reproducible. Skipped when `root` already
    holds a complete set for the same parameters: synthetic.json says complete only once every file
    is written, so a half-written folder is written again (the marker, written atomically, is what makes
    the set whole). Writes only into a missing or empty folder, or one holding its marker. Returns root."""
    if n_train < 0 or n_val < 0 or n_train + n_val == 0:
        raise ValueError(f'make_synthetic needs n_train, n_val >= 0 and at least one scene, got {n_train}, {n_val}')
    params = dict(version=GENERATOR_VERSION, n_train=n_train, n_val=n_val, size=list(size), seed=seed)
    marker = os.path.join(root, 'synthetic.json')
    if os.path.isfile(marker):
        with open(marker) as f:
            try:
                done = json.load(f)
            except ValueError:  # cut short by a kill or a full disk (before it was written atomically)
                done = {}
        if done.get('complete') and all(done.get(k) == v for k, v in params.items()):
            return root
    elif os.path.isdir(root) and os.listdir(root):  # never write into a folder of someone else's files
        names = sorted(os.listdir(root))
        raise DataError(f'{root}: holds files that make_synthetic did not write ({", ".join(names[:3])}'
                        f'{", ..." * (len(names) > 3)}); pass an empty or new folder for the synthetic scenes')
    for folder in ('images', 'segmentation', 'depth', 'normals', 'edge', 'gt_sets'):
        os.makedirs(os.path.join(root, folder), exist_ok=True)
    atomic_write(marker, lambda f: f.write(json.dumps(dict(params, complete=False)).encode()))
    n = n_train + n_val
    ids = [f'{i:0{max(4, len(str(n - 1)))}d}' for i in range(n)]
    for i, id_ in enumerate(ids):
        s = render_scene(np.random.default_rng([seed, i]), size)
        png = dict(compress_level=1)
        Image.fromarray(s['image']).save(os.path.join(root, 'images', id_ + '.png'), **png)
        Image.fromarray(s['labels']).save(os.path.join(root, 'segmentation', id_ + '.png'), **png)
        np.save(os.path.join(root, 'depth', id_ + '.npy'), s['depth'])
        rgb = np.round((s['normals'] + 1) / 2 * 255).astype(np.uint8)  # n = 2 v / 255 - 1
        Image.fromarray(rgb).save(os.path.join(root, 'normals', id_ + '.png'), **png)
        Image.fromarray(s['edge'] * 255).save(os.path.join(root, 'edge', id_ + '.png'), **png)
        _progress(i + 1, n, f'synthetic scenes written to {root}')
    for split, part in (('train', ids[:n_train]), ('val', ids[n_train:])):
        text = ''.join(f'{id_}\n' for id_ in part).encode()
        atomic_write(os.path.join(root, 'gt_sets', f'{split}.txt'), lambda f: f.write(text))
    # last: the folder is complete
    atomic_write(marker, lambda f: f.write(json.dumps(dict(params, complete=True, intrinsics=list(s['intrinsics']))).encode()))
    return root


def write_synthetic(config):
    """The synthetic scenes of a train.py config (--scenes, at its network size, seed 0) written once
    into config['data_root'] (see make_synthetic) -> that folder."""
    n_train, n_val = config['scenes']
    return make_synthetic(config['data_root'], n_train=n_train, n_val=n_val, size=tuple(config['img_size']),
                          seed=0)
