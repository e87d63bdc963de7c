"""Data for TaskExpert: NYUD-v2 and PASCAL-Context readers in the published multi-task formats, the
reference training augmentations, DataLoader helpers, and a synthetic indoor-scene generator that
writes NYUD-layout data. "The reference" is the ATRC / InvPT data code (README, 'References').

A sample (contract): 'image' float32 (3, H, W) ImageNet-normalised; 'semseg' / 'human_parts' int64
(H, W) with 255 = void; 'sal' / 'edge' float32 (1, H, W) in {0, 1} with 255 = padding; 'normals'
float32 (3, H, W) as stored, 2 v / 255 - 1 (near-unit vectors), all-zero = invalid (padding);
'depth' float32 (1, H, W) metres, 0 = invalid;
'meta' {'id', 'size': (h, w) of the unpadded content, PASCAL also 'has_human'}.
Inside this module, before the final conversion, a sample is a dict of numpy arrays in HWC layout:
image uint8 (h, w, 3), labels uint8 (h, w) with 255 = void, depth float32 (h, w), normals float32
(h, w, 3).
"""
import colorsys
import contextlib
import json
import os
import re
import sys

import numpy as np
import scipy.io
import scipy.ndimage
import torch
from PIL import Image

from taskexpert import PATCH, TASKS, thin

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

DOWNLOAD_HELP = """\
Datasets (README.md, section 'Datasets'): the multi-task copies used by ATRC / InvPT,
  https://data.vision.ee.ethz.ch/brdavid/atrc/NYUDv2.tar.gz
  https://data.vision.ee.ethz.ch/brdavid/atrc/PASCALContext.tar.gz
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

_SEE_README = "get the dataset as described in README.md, section 'Datasets'"


class DataError(FileNotFoundError, ValueError):
    """A dataset folder, split file or sample file that is missing or unreadable (one-line message)."""


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
    """Delete the temporary files of atomic_write calls that a kill interrupted (.<name>.tmp<pid>).
    Only for a folder that no other process is writing into."""
    for name in os.listdir(folder):
        if re.fullmatch(r'\..+\.tmp\d+', name):
            os.remove(os.path.join(folder, name))


def _progress(done, n, what):
    """'what: done/n' on stderr, rewritten in place about 100 times in all (so a log file gets few lines)."""
    if done % max(1, n // 100) == 0 or done == n:
        print(f'\r{what}: {done}/{n}', end='\n' if done == n else '', file=sys.stderr, flush=True)


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

# -------------------------------------------------------------------------------------------------
# Reading files: every failure becomes a DataError naming the file
# -------------------------------------------------------------------------------------------------


def _read(path, load):
    try:
        return load(path)
    except Exception as e:  # PIL, numpy and scipy raise many types for a damaged file
        raise DataError(f'{path}: cannot read it ({type(e).__name__}: {e}); re-extract it or '
                        f'{_SEE_README}') from e


def _png(path, mode=None):
    def load(p):
        with Image.open(p) as im:
            return np.array(im.convert(mode) if mode else im)
    return _read(path, load)


def _mat(path, key):
    m = _read(path, scipy.io.loadmat)
    if key not in m:
        raise DataError(f'{path}: has no {key!r} variable; re-extract it or {_SEE_README}')
    return m[key]


def _read_split(path):
    if not os.path.isfile(path):
        raise DataError(f'{path}: split file not found; {_SEE_README}')
    with open(path) as f:
        ids = [line.strip() for line in f if line.strip()]
    if not ids:
        raise DataError(f'{path}: split file lists no ids; {_SEE_README}')
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


def _check_labels(path, a, top):
    bad = (a > top) & (a != 255)
    if bad.any():
        raise DataError(f'{path}: label {int(a[bad][0])} outside 0..{top} (255 = void)')


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
    """PASCAL edge ground truth: thin(|Laplacian(LabelMap)| > 0) (h, w) uint8 {0, 1}. The Laplacian
    is OpenCV's default 3x3 one with reflect-101 borders (scipy 'mirror'), as in the reference."""
    lap = scipy.ndimage.convolve(labelmap.astype(np.float64), _LAPLACE, mode='mirror')
    return thin(np.abs(lap) > 0).astype(np.uint8)


def human_parts_from_anno(path, shape):
    """human_parts/<id>.mat -> (parts uint8 (h, w) 0 = background, 1..6, has_human bool). The
    `anno` struct holds `objects` (class, class_ind, mask, parts); each part has part_name, mask.
    Only person objects (class_ind 15) that carry parts are drawn, as in the reference."""
    anno = _mat(path, 'anno')
    target = np.zeros(shape, np.uint8)
    has_human = False
    objects = anno[0, 0]['objects']
    for obj in objects.ravel():
        parts = obj['parts']
        if int(np.asarray(obj['class_ind']).ravel()[0]) != PERSON_CLASS or parts.size == 0:
            continue
        has_human = True
        for part in parts.ravel():
            name = str(np.asarray(part['part_name']).ravel()[0])
            if name not in HUMAN_PART_GROUPS:
                raise DataError(f'{path}: unknown person part {name!r}')
            mask = np.asarray(part['mask']).astype(bool)
            _check_shape(path, mask, shape)
            target[mask] = HUMAN_PART_GROUPS[name]
    return target, has_human


# -------------------------------------------------------------------------------------------------
# Augmentations of the reference recipe: scale, crop, flip, photometric jitter, normalise, pad
# -------------------------------------------------------------------------------------------------

_PAD = {'image': 0, 'depth': 0, 'normals': 0}  # every other (label) key pads with 255 = void


def _nearest(a, h, w):
    """Nearest-neighbour resize of (h0, w0[, C]) to (h, w), pixel-centre aligned like PIL's."""
    rows = np.minimum(((np.arange(h) + 0.5) * a.shape[0] / h).astype(np.int64), a.shape[0] - 1)
    cols = np.minimum(((np.arange(w) + 0.5) * a.shape[1] / w).astype(np.int64), a.shape[1] - 1)
    return a[rows[:, None], cols]


def random_scale(sample, rng, lo=0.5, hi=2.0):
    """Resize everything by one factor s ~ U(lo, hi): bilinear for the image, nearest for the labels
    (nearest copies the stored normal vectors); depth / s, as the scene looks s times closer."""
    s = rng.uniform(lo, hi)
    h0, w0 = sample['image'].shape[:2]
    h, w = max(1, round(h0 * s)), max(1, round(w0 * s))
    out = {}
    for k, a in sample.items():
        if k == 'image':
            out[k] = np.asarray(Image.fromarray(a).resize((w, h), Image.BILINEAR))
        else:
            out[k] = _nearest(a, h, w)
    if 'depth' in out:
        out['depth'] = out['depth'] / np.float32(s)
    return out


def random_crop(sample, size, rng, max_ratio=0.75, tries=10):
    """Crop a window of size min(image, size); re-drawn (up to `tries` times) while one semseg class
    covers more than `max_ratio` of its labelled pixels, as mmseg's cat_max_ratio does."""
    h0, w0 = sample['image'].shape[:2]
    h, w = min(h0, size[0]), min(w0, size[1])
    for _ in range(tries):
        y, x = rng.integers(0, h0 - h + 1), rng.integers(0, w0 - w + 1)
        if 'semseg' not in sample:
            break
        labels = sample['semseg'][y:y + h, x:x + w]
        counts = np.bincount(labels[labels != 255].ravel())
        if counts.sum() == 0 or counts.max() <= max_ratio * counts.sum():
            break
    return {k: a[y:y + h, x:x + w] for k, a in sample.items()}


def hflip(sample):
    """Mirror everything left-right; a mirrored normal points the other way in x."""
    out = {k: a[:, ::-1] for k, a in sample.items()}
    if 'normals' in out:
        out['normals'] = out['normals'] * np.array([-1, 1, 1], np.float32)
    return out


def photometric(image, rng):
    """mmseg-style PhotoMetricDistortion on the image only, each step with p = 0.5: brightness
    +-32, contrast x[0.5, 1.5], saturation x[0.5, 1.5], hue +-18 deg. uint8 -> float32 0..255."""
    x = image.astype(np.float32)
    if rng.random() < 0.5:
        x = x + rng.uniform(-32, 32)
    if rng.random() < 0.5:
        x = x * rng.uniform(0.5, 1.5)
    x = np.clip(x, 0, 255)
    sat, hue = rng.random() < 0.5, rng.random() < 0.5
    if sat or hue:
        hsv = np.asarray(Image.fromarray(x.astype(np.uint8)).convert('HSV')).astype(np.float32)
        if sat:
            hsv[..., 1] = np.clip(hsv[..., 1] * rng.uniform(0.5, 1.5), 0, 255)
        if hue:  # PIL's hue runs 0..255 for 0..360 deg
            hsv[..., 0] = (hsv[..., 0] + rng.uniform(-18, 18) * 255 / 360) % 256
        x = np.asarray(Image.fromarray(hsv.astype(np.uint8), 'HSV').convert('RGB')).astype(np.float32)
    return x


def augment(sample, size, rng):
    """The reference training transforms in order: scale, crop, flip, photometric jitter.
    Returns the sample (image float32 0..255) and its size (h, w) before padding."""
    sample = random_crop(random_scale(sample, rng), size, rng)
    if rng.random() < 0.5:
        sample = hflip(sample)
    # a crop without any part pixel (an image without people, or a person cropped away) says
    # nothing about parts: ignored entirely, as the published training transforms do (InvPT
    # data/transforms.py, AddIgnoreRegions), instead of teaching the parts head "background" everywhere
    parts = sample.get('human_parts')
    if parts is not None and not ((parts > 0) & (parts < 255)).any():
        sample['human_parts'] = np.full_like(parts, 255)
    sample['image'] = photometric(sample['image'], rng)
    return sample, sample['image'].shape[:2]


def to_tensors(sample, size):
    """ImageNet-normalise the image and pad everything at the bottom / right to `size` (image 0
    after normalisation, depth / normals 0, labels 255) -> the contract's tensors."""
    h, w = sample['image'].shape[:2]
    out = {}
    for k, a in sample.items():
        a = np.asarray(a)
        if k == 'image':
            a = (a.astype(np.float32) / 255.0 - np.array(IMAGENET_MEAN, np.float32)) / np.array(IMAGENET_STD, np.float32)
        pad = ((0, size[0] - h), (0, size[1] - w)) + ((0, 0),) * (a.ndim - 2)
        a = np.pad(a, pad, constant_values=_PAD.get(k, 255))
        if k in ('semseg', 'human_parts'):
            out[k] = torch.from_numpy(a.astype(np.int64))  # (H, W)
        elif a.ndim == 3:
            out[k] = torch.from_numpy(np.ascontiguousarray(a.transpose(2, 0, 1), np.float32))  # (C, H, W)
        else:
            out[k] = torch.from_numpy(np.ascontiguousarray(a, np.float32))[None]  # (1, H, W)
    return out


# -------------------------------------------------------------------------------------------------
# Datasets
# -------------------------------------------------------------------------------------------------


class _MultiTaskDataset(torch.utils.data.Dataset):
    """Shared by the readers: task checks, ids, and load -> (augment | pad) -> tensors.
    `rng` (numpy Generator) drives the augmentations; train_loader re-seeds it per sample."""
    dataset = None  # key of TASKS

    def __init__(self, root, split, train, size, tasks, seed):
        known = TASKS[self.dataset]
        self.tasks = tuple(known if tasks is None else tasks)
        unknown = [t for t in self.tasks if t not in known]
        if unknown:
            raise ValueError(f'unknown {self.dataset} task(s) {unknown}: choose from {", ".join(known)}')
        if not os.path.isdir(root):
            raise DataError(f'{root}: dataset folder not found; {_SEE_README}')
        self.root, self.split, self.train, self.size = root, split, train, tuple(size)
        self.rng = np.random.default_rng(seed)

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        sample, meta = self.load(i)
        if self.train:
            sample, meta['size'] = augment(sample, self.size, self.rng)
        else:
            self._check_fits(i, *meta['size'])
        out = to_tensors(sample, self.size)
        out['meta'] = meta
        return out

    def _check_fits(self, i, h, w, most=None):
        """Without augmentation (whose crop fits any image to the network) an image is only padded:
        it must not be larger than the network size. most: the split's largest (h, w), for the advice."""
        if h > self.size[0] or w > self.size[1]:
            fit = [-(-max(x, s) // PATCH) * PATCH for x, s in zip(most or (h, w), self.size)]
            raise DataError(f'{self.path("image", self.ids[i])}: image {h}x{w} is larger than the network size '
                            f'{self.size[0]}x{self.size[1]}; pass --img-size {fit[0]} {fit[1]} or larger')

    def check(self, workers=0, rank=0, world=1):
        """Read every sample once (this process's share: every world-th from rank), as training and
        evaluation will, so a damaged file, an out-of-range label, a map of the wrong size or an image
        larger than the network stops the run with one line (DataError) before its first step rather
        than at the step, or the evaluation, that first reads it. Progress on stderr for 200+ samples.
        Without augmentation the error names the largest image, so one --img-size fits them all."""
        share = range(rank, len(self), world)
        loader = torch.utils.data.DataLoader(_Probe(self), batch_size=None, sampler=share, num_workers=workers)
        most, too_large = (0, 0), None  # the largest height and width; (i, h, w) of a first image too large
        for done, (i, problem, (h, w)) in enumerate(loader, 1):
            if problem:
                raise DataError(problem)
            most = max(most[0], h), max(most[1], w)
            if too_large is None and (h > self.size[0] or w > self.size[1]):
                too_large = i, h, w
            if rank == 0 and len(share) >= 200:
                _progress(done, len(share), f'checking {self.split} ({self.root})')
        if too_large and not self.train:
            self._check_fits(*too_large, most=most)


class _Probe(torch.utils.data.Dataset):
    """Sample i of a reader -> (i, the problem with it or '', its (h, w)). A problem comes back as a
    value, not an exception, so that one read in a worker process stays one line."""

    def __init__(self, reader):
        self.reader = reader

    def __getitem__(self, i):
        try:
            _, meta = self.reader.load(i)
        except DataError as e:
            return i, str(e), (0, 0)
        return i, '', meta['size']


class NYUD(_MultiTaskDataset):
    """NYUD-v2 as in NYUDv2.tar.gz (ATRC / InvPT layout, see DOWNLOAD_HELP); also the synthetic
    scenes. semseg 1..40 -> 0..39 with void 0 -> 255; depth metres; normals as decoded; edge {0, 1}."""
    dataset = 'nyud'
    FILES = {'semseg': ('segmentation', '.png'), 'depth': ('depth', '.npy'),
             'normals': ('normals', '.png'), 'edge': ('edge', '.png')}

    def __init__(self, root, split='train', train=True, size=(448, 576), tasks=None, seed=0):
        super().__init__(root, split, train, size, tasks, seed)
        split_file = os.path.join(root, 'gt_sets', f'{split}.txt')
        self.ids = _read_split(split_file)
        _check_files([self.path(t, i) for i in self.ids for t in ('image',) + self.tasks], split_file)

    def path(self, task, id_):
        folder, ext = ('images', '.png') if task == 'image' else self.FILES[task]
        return os.path.join(self.root, folder, id_ + ext)

    def load(self, i):
        id_ = self.ids[i]
        image = _png(self.path('image', id_), 'RGB')
        shape = image.shape[:2]
        sample = {'image': image}
        for t in self.tasks:
            p = self.path(t, id_)
            if t == 'semseg':
                raw = _png(p)
                _check_labels(p, raw, 40)
                a = (raw.astype(np.int64) - 1).astype(np.uint8)  # 0 (void) - 1 wraps to 255
            elif t == 'depth':
                a = _read(p, np.load).astype(np.float32).squeeze()
                a[~np.isfinite(a) | (a < 0)] = 0  # 0 = invalid
            elif t == 'normals':
                a = decode_normals(_png(p, 'RGB'))
            else:  # edge, stored 0 / 255
                a = (_png(p, 'L') > 127).astype(np.uint8)
            _check_shape(p, a, shape)
            sample[t] = a
        return sample, {'id': id_, 'size': shape}


class PASCALContext(_MultiTaskDataset):
    """PASCAL-Context multi-task as in PASCALContext.tar.gz (ATRC / InvPT layout, see DOWNLOAD_HELP).
    semseg 0..20 with 255 void; human parts from the `anno` struct; saliency /255 > 0.5; normals kept
    on PASCAL_NORMAL_CLASSES; edges thin(|Laplacian(LabelMap)| > 0)."""
    dataset = 'pascal'

    def __init__(self, root, split='train', train=True, size=(512, 512), tasks=None, seed=0):
        super().__init__(root, split, train, size, tasks, seed)
        split_file = os.path.join(root, 'ImageSets', 'Context', f'{split}.txt')
        self.ids = _read_split(split_file)
        need = ('image',) + self.tasks + (('labelmap',) if 'normals' in self.tasks else ())
        _check_files([self.path(t, i) for i in self.ids for t in need], split_file)

    def path(self, task, id_):
        """The file of `task` ('image', a task, or 'labelmap') for sample `id_`; edges come from
        the LabelMap."""
        r = self.root
        if task == 'semseg':  # the VOC12 masks where they exist, else the Context-derived ones
            voc = os.path.join(r, 'semseg', 'VOC12', id_ + '.png')
            return voc if os.path.isfile(voc) else os.path.join(r, 'semseg', 'pascal-context', id_ + '.png')
        return os.path.join(r, *{'image': ('JPEGImages', id_ + '.jpg'),
                                 'labelmap': ('pascal-context', 'trainval', id_ + '.mat'),
                                 'edge': ('pascal-context', 'trainval', id_ + '.mat'),
                                 'human_parts': ('human_parts', id_ + '.mat'),
                                 'normals': ('normals_distill', id_ + '.png'),
                                 'sal': ('sal_distill', id_ + '.png')}[task])

    def load(self, i):
        id_ = self.ids[i]
        image = _png(self.path('image', id_), 'RGB')
        shape = image.shape[:2]
        sample, meta = {'image': image}, {'id': id_, 'size': shape, 'has_human': False}
        labelmap = None
        if 'edge' in self.tasks or 'normals' in self.tasks:
            p = self.path('labelmap', id_)
            labelmap = _mat(p, 'LabelMap')
            _check_shape(p, labelmap, shape)
        for t in self.tasks:
            p = self.path(t, id_)
            if t == 'semseg':
                a = _png(p)
                _check_labels(p, a, 20)
                a = a.astype(np.uint8)
            elif t == 'human_parts':
                a, meta['has_human'] = human_parts_from_anno(p, shape)
            elif t == 'sal':
                a = (_png(p, 'L').astype(np.float32) / 255.0 > 0.5).astype(np.uint8)
            elif t == 'normals':
                keep = np.isin(labelmap, PASCAL_NORMAL_CLASSES)[..., None]
                a = np.where(keep, decode_normals(_png(p, 'RGB')), 0).astype(np.float32)
            else:  # edge
                a = labelmap_edges(labelmap)
            _check_shape(p, a, shape)
            sample[t] = a
        return sample, meta


# -------------------------------------------------------------------------------------------------
# Batching
# -------------------------------------------------------------------------------------------------


def collate(samples):
    """Stack every tensor along a new dim 0; 'meta' stays a list of dicts."""
    batch = {k: torch.stack([s[k] for s in samples]) for k in samples[0] if k != 'meta'}
    batch['meta'] = [s['meta'] for s in samples]
    return batch


class StepBatches(torch.utils.data.Sampler):
    """Batches of steps start..stop-1 for one process. Step s is batch s % per_epoch of epoch
    s // per_epoch, whose order is a permutation drawn from (seed, epoch); each process reads its
    slice of the global batch. Items are (index, epoch) so the sample's augmentation can be seeded."""

    def __init__(self, n, global_batch, rank, world, seed, start, stop):
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


def train_loader(dataset, global_batch, rank, world, seed, start, stop, workers):
    """The training stream of steps start..stop-1 for process `rank` of `world` (StepBatches): every
    batch and augmentation is a function of (seed, step), so a resumed run reads what an
    uninterrupted one would have, with or without worker processes."""
    return torch.utils.data.DataLoader(
        SeededSamples(dataset, seed), batch_sampler=StepBatches(len(dataset), global_batch, rank, world, seed, start,
                                                                stop),
        num_workers=workers, collate_fn=collate, pin_memory=torch.cuda.is_available(),
        generator=torch.Generator().manual_seed(seed))  # its worker seeds: never drawn from the global RNG


def eval_loader(dataset, batch_size, workers):
    """`dataset` (not augmented) in order, every item once; its workers persist between evaluations."""
    return torch.utils.data.DataLoader(
        dataset, batch_size=batch_size, num_workers=workers, collate_fn=collate, pin_memory=torch.cuda.is_available(),
        persistent_workers=workers > 0, generator=torch.Generator())  # (as above: the global RNG untouched)


# -------------------------------------------------------------------------------------------------
# Synthetic indoor scenes in the NYUD layout (README, 'Quick start')
# A room is the inside of an axis-aligned box (world y up, metres); furniture are boxes with a yaw;
# one ray per pixel is cast with slab tests, vectorised over pixels (one box at a time).
# -------------------------------------------------------------------------------------------------

GENERATOR_VERSION = 3  # bump when the scenes change, so cached folders are regenerated
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
    boxes = []

    def box(name, centre, yaw, size):
        boxes.append(dict(cls=_cls(name), centre=np.asarray(centre, float), yaw=yaw, half=np.asarray(size) / 2))

    # walls as (yaw of an item facing into the room, point on the wall at the origin of its width axis)
    walls = [(np.pi / 2, lambda a: (0.0, a)), (-np.pi / 2, lambda a: (room[0], a)),
             (0.0, lambda a: (a, 0.0)), (np.pi, lambda a: (a, room[2]))]
    wall_len = (room[2], room[2], room[0], room[0])
    names = list(_FLOOR_ITEMS)
    weights = np.array([_FLOOR_ITEMS[n][1] for n in names])
    footprints = []  # (x, z, radius) of the floor items, to avoid piling them into each other
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
                box(name, (x, size[1] / 2, z), yaw, size)
                break
    for parent in list(boxes):  # small items on top of furniture
        options = [n for n, (_, on) in _TOP_ITEMS.items() if NYU40_CLASSES[parent['cls'] - 1] in on]
        if not options or rng.random() < 0.4:
            continue
        name = options[rng.integers(len(options))]
        size = np.minimum([rng.uniform(*r) for r in _TOP_ITEMS[name][0]], 2 * parent['half'] * 0.9)
        local = [rng.uniform(-1, 1) * (parent['half'][i] - size[i] / 2) for i in (0, 2)]
        top = parent['centre'][1] + parent['half'][1]
        centre = parent['centre'] + _rot_y(parent['yaw']) @ np.array([local[0], 0, local[1]])
        box(name, (centre[0], top + size[1] / 2, centre[2]), parent['yaw'] + rng.normal(0, 0.2), size)
    placed = []  # (wall, a0, a1, y0, y1) of the wall items: no two may overlap (coplanar fronts)
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
        box(name, (x + inward[0] * thick / 2, b + h / 2, z + inward[2] * thick / 2), walls[k][0], (w, h, thick))
    if rng.random() < 0.3:
        size = (rng.uniform(0.8, 2.5), rng.uniform(0.01, 0.02), rng.uniform(0.6, 1.8))
        box('floor mat', (rng.uniform(1, room[0] - 1), size[1] / 2, rng.uniform(1, room[2] - 1)),
            rng.uniform(0, np.pi), size)
    return room, boxes


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
    (h, w, 3) in the camera frame (x right, y down, z forward, facing the camera), edge uint8 {0, 1}."""
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
    # lighting: ambient + Lambert from a lamp 10 cm above the lens (a flash, a head-mounted lamp),
    # with box shadows and a near inverse-square fall-off. A light at the camera makes brightness
    # fall with distance and with the surface's angle to the view: a depth and orientation cue a
    # small model learns from scratch in minutes (README, 'Results').
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
    image = np.clip((albedo * shade[:, None] * tint.astype(np.float32)) ** (1 / 1.2) * 255 + noise, 0, 255)
    # ground truth, all from the same hits
    labels = classes[inst].reshape(h, w).astype(np.uint8)
    depth = np.where(valid, t, 0).reshape(h, w).astype(np.float32)
    normals = (normal @ rot.astype(np.float32)).reshape(h, w, 3)  # world -> camera is R^T n
    inst = inst.reshape(h, w)
    # edges: boundaries between surfaces (different instance), both sides, so 2 px wide
    edge = np.zeros((h, w), bool)
    dy, dx = inst[1:] != inst[:-1], inst[:, 1:] != inst[:, :-1]
    edge[1:] |= dy
    edge[:-1] |= dy
    edge[:, 1:] |= dx
    edge[:, :-1] |= dx
    return dict(image=image.reshape(h, w, 3).astype(np.uint8), labels=labels, depth=depth,
                normals=normals, edge=edge.astype(np.uint8), intrinsics=(fx, fy, cx, cy))


def make_synthetic(root, n_train=300, n_val=100, size=(240, 320), seed=0):
    """Write n_train + n_val random scenes to `root` in the NYUD layout (images/, segmentation/,
    depth/, normals/, edge/, gt_sets/{train,val}.txt), so NYUD(root, ...) reads them. Scene i is
    drawn from numpy's Generator seeded with (seed, i): reproducible. Skipped when `root` already
    holds a complete set for the same parameters: synthetic.json says complete only once every file
    is written, so a half-written folder is written again. Returns root."""
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
    elif os.path.isdir(os.path.join(root, 'gt_sets')):
        raise DataError(f'{root}: holds a dataset that make_synthetic did not write; choose another folder')
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
        with open(os.path.join(root, 'gt_sets', f'{split}.txt'), 'w') as f:
            f.write(''.join(f'{id_}\n' for id_ in part))
    # last: the folder is complete
    atomic_write(marker, lambda f: f.write(json.dumps(dict(params, complete=True, intrinsics=list(s['intrinsics']))).encode()))
    return root
