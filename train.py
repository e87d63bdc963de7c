"""Train and evaluate TaskExpert: the paper's recipe first (Part I), then the machinery (Part II).

    python train.py                                   # synthetic scenes, from scratch, minutes on a CPU
    python train.py --dataset nyud                    # the paper recipe: ViT-L from ImageNet weights (fetched once)
    torchrun --nproc_per_node=4 train.py --dataset pascal --backbone base    # DistributedDataParallel
    python train.py --resume runs/nyud/last.pt                               # continue where it stopped
    python train.py --config runs/nyud/config.json --out-dir runs/nyud-2     # a run again, from its settings
    python train.py --eval-only --checkpoint runs/nyud/best.pt
    python train.py --predict my_photos/ --checkpoint runs/nyud/best.safetensors
    python train.py --benchmark --dataset nyud                         # FLOPs, speed, MFU, memory

A run writes to --out-dir (default runs/<dataset>): config.json (its settings), train.jsonl and
metrics.jsonl (its logs; the last evaluation is the one to report), TensorBoard events, pictures,
last.pt (to resume) and best.pt / best.safetensors. docs/training.md, 'What a run writes', has each file.
"""
import argparse, contextlib, dataclasses, datetime, errno, itertools, json, math, multiprocessing, os, random, re
import resource, shutil, signal, socket, statistics, sys, tempfile, threading, time
from typing import NamedTuple

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from PIL import Image, ImageDraw
from torch.utils.flop_counter import FlopCounterMode

import data
from data import DataError
from taskexpert import (ABLATIONS, IMAGENET_WEIGHTS, PATCH, TASK_SET, TASK_TABLE, TASKS, VIT_PRESETS, MultiTaskLoss,
                        TaskExpert, atomic_write, default_taps, denormalise, load_pretrained, load_weights, postprocess,
                        predict, pretrained_file, read_checkpoint, remove_temporaries, rgb_image, save_checkpoint,
                        save_weights, unknown_kind)


def build(cfg, *, device, world, rank, amp_dtype, use_scaler, pretrained=None, resume=None):
    """The Run of cfg: the model, from ImageNet weights (the file `pretrained`) or from the state of
    resume = (path, checkpoint), its blocks and MMoEs compiled with --compile; what trains it (DDP around
    it, or itself); Adam; the GradScaler; the loss."""
    torch.manual_seed(cfg['seed'] + rank)  # initialisation (identical across ranks: DDP broadcasts rank 0's)
    model = TaskExpert.from_config(cfg).to(device)
    if pretrained:
        load_imagenet(model, pretrained)
    if world > 1 and device.type == 'cuda':
        # BatchNorm statistics over the global batch, not each GPU's share (the paper's batch 4 on 4
        # GPUs: one image each); same state dict keys. (gloo has no SyncBatchNorm: on CPUs each process
        # keeps its own statistics.)
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    params = [p for p in model.parameters() if p.requires_grad]
    # fused: one kernel for all parameters (and under fp16 the GradScaler's skip test stays on the device)
    optimizer = torch.optim.Adam(params, lr=cfg['lr'], weight_decay=cfg['weight_decay'], fused=True)
    scaler = torch.amp.GradScaler(device.type, enabled=use_scaler)
    if resume:
        restore(model, optimizer, scaler, resume, rank)
    if cfg['compile']:  # the blocks and MMoEs, each compiled in place (compile_regions); the heads eager
        compile_regions(model)
    trained = model  # evaluations and checkpoints use `model` itself
    if world > 1:  # gradients as views of DDP's all-reduce buckets: one gradient-sized copy less
        trained = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == 'cuda' else None, gradient_as_bucket_view=True)
    loss_fn = MultiTaskLoss(model.tasks, weights=cfg['loss_weights'], pos_weights={'edge': cfg['edge_pos_weight']})
    return Run(cfg, model, trained, optimizer, scaler, loss_fn, device, amp_dtype, world)


def lr_at(step, cfg):
    """Linear warm-up over cfg['warmup'] steps, times the poly decay (1 - step / max_iters)^0.9."""
    lr = cfg['lr'] * (1 - step / cfg['max_iters']) ** 0.9
    return lr * min(1.0, (step + 1) / cfg['warmup']) if cfg['warmup'] else lr


def train_step(run, batch):
    """One optimizer step on this process's share of the global batch, run as cfg['accum_steps']
    micro-batches, then clip and Adam. -> (loss, per-task losses, why the step was skipped or None).

    One path for every precision: autocast runs the forward in bf16 or fp16 (off: fp32), and the
    GradScaler, enabled under fp16 only, scales the loss and unscales the gradients. Each micro-batch
    backpropagates its loss / accum_steps: the gradient of the mean micro-batch loss, which DDP
    averages over the processes, all-reducing once, on the last micro-batch. That is one step on the
    whole batch when the micro-batches hold equally many valid pixels per task (the losses are means
    over valid pixels), BatchNorm aside (it normalises each micro-batch with its own statistics)."""
    accum, scaler, optimizer = run.cfg['accum_steps'], run.scaler, run.optimizer
    m = len(batch['image']) // accum
    total, per_task = 0.0, {}
    for i in range(accum):
        micro = {k: v[i * m:(i + 1) * m] for k, v in batch.items()}
        with run.trained.no_sync() if run.world > 1 and i < accum - 1 else contextlib.nullcontext():
            with autocast(run.device, run.amp_dtype):
                outputs = run.trained(micro['image'])
            loss, losses = run.loss_fn(outputs, micro)
            scaler.scale(loss / accum).backward()
        total = total + loss.detach() / accum
        per_task = {t: per_task.get(t, 0.0) + v.detach() / accum for t, v in losses.items()}
    scaler.unscale_(optimizer)
    params = [p for g in optimizer.param_groups for p in g['params']]
    grad_norm = torch.nn.utils.clip_grad_norm_(params, run.cfg['clip'])  # of the all-reduced gradients
    # The skip rule: a step whose loss or gradient is not finite is not applied, on every process alike.
    # (Under fp16 a non-finite gradient is the GradScaler's overflow: its step skips it and lowers the scale.)
    skipped = why_skipped(run, total, grad_norm, per_task)
    if skipped is None:
        scaler.step(optimizer)
    scaler.update()
    optimizer.zero_grad(set_to_none=True)
    return total, per_task, skipped


def train(cfg, device, world, rank, resume=None, pool=None):
    """The training loop: from step 0 (or the step of resume = (path, checkpoint)) to --max-iters, a
    progress line every --log-every steps, last.pt and an evaluation every --eval-every steps and at
    the end."""
    run, train_ds, step = start(cfg, device, world, rank, resume, pool)
    if step >= cfg['max_iters']:
        log(f'the checkpoint is already at step {step} of --max-iters {cfg["max_iters"]}: nothing to train')
        return
    run.model.train()
    bad = 0  # consecutive non-finite steps
    losses = LossLog()
    for batch in data.train_loader(train_ds, cfg['batch_size'], rank=rank, world=world, seed=cfg['seed'],
                                   start=step, stop=cfg['max_iters'], workers=cfg['workers']):
        lr = lr_at(step, cfg)
        for g in run.optimizer.param_groups:
            g['lr'] = lr
        total, per_task, skipped = train_step(run, to_device(batch, device))
        step += 1
        if skipped:
            bad += 1
            log(f'step {step}: {skipped}: step skipped ({bad} in a row)')
            if bad >= MAX_BAD_STEPS:
                fail(f'{bad} non-finite steps in a row at step {step}: lower --lr or try --amp off')
        else:
            bad = 0
            losses.add(total, per_task)
        if losses.steps and (step % cfg['log_every'] == 0 or step == cfg['max_iters']):
            losses.report(run, step, lr)
        if step % cfg['eval_every'] == 0 or step == cfg['max_iters']:
            evaluation_step(run, step, bad)  # last.pt, then evaluate -> report -> best.*
            run.model.train()
            losses.t0 = time.time()  # the evaluation is not training time
    if run.board:
        run.board.close()


@torch.no_grad()
def evaluate(model, loader, *, dataset, device, keep=0, pool=None, save_to=None):
    """The model in fp32 (no autocast, no TF32, as the authors evaluate) on this process's share of the val
    split (`loader`, see shard_loader) -> Evaluation: the meters' scores (data.update_meters) and the mean
    gate weights (forward_with_gates). Under torchrun the sums are all-reduced: every process returns
    the whole split's. keep: the first samples to draw; save_to: a folder for the predictions' files."""
    model.eval()
    if dist.is_initialized():  # every process scores rank 0's model, the one its checkpoint holds: without
        for b in model.buffers():  # SyncBatchNorm (gloo) each process's BN statistics follow its own images
            dist.broadcast(b, 0)
    split = whole_split(loader)
    meters = data.make_meters(model.tasks, dataset, pool)
    on_cpu = [t for t in meters if TASK_TABLE[t].meter == 'boundary']  # (the boundary workers read them there)
    gates = GateMeans(model, device)
    kept, done, t0 = [], 0, time.time()
    # CPU meters beside busy boundary workers: one thread, else the meters' intra-op threads wait on
    # descheduled peers (docs/results.md, 'What an evaluation costs')
    threads = torch.get_num_threads()
    meter_threads = 1 if pool and device.type == 'cpu' else threads
    with fp32_precision('ieee'), autocast(device, None):  # TF32 and autocast off, whatever trains with them
        for batch in loader:
            batch = to_device(batch, device, keep=on_cpu)  # the meters' targets too: one copy per batch
            outputs, gate_weights = model.forward_with_gates(batch['image'])
            gates.add(gate_weights, batch['meta'], batch['image'].shape[-2:])
            torch.set_num_threads(meter_threads)
            data.update_meters(meters, outputs, batch)
            if save_to:
                data.write_predictions(save_to, outputs, batch)
            torch.set_num_threads(threads)  # (the model's)
            for meta, preds, targets in itertools.islice(data.crops(outputs, batch), keep - len(kept)):
                kept.append((targets['image'][0].cpu(), {t: targets[t][0].cpu() for t in meters},
                             {t: preds[t][0].cpu() for t in meters}, meta['id']))
            done += len(batch['meta'])
            log_progress(done, len(batch['meta']), len(loader.dataset), len(split), t0)
    sums = [x for m in meters.values() for x in m.state()] + gates.state()
    if dist.is_initialized():  # every sum over all processes (gloo: CPU tensors, nccl: CUDA ones)
        for x in sums:
            y = x.to(device)
            dist.all_reduce(y)
            x.copy_(y)
    return Evaluation(split, {t: m.score() for t, m in meters.items()}, gates.means(), kept, time.time() - t0)


# Part II: the machinery: settings and checks, the run folder and its logs, reports, pictures, --predict, the CLI

# -------------------------------------------------------------------------------------------------
# Settings. resolve_config layers them, in one place: COMMON < the dataset's row < a --config file <
# the flags given. nyud / pascal follow the authors' recipe (docs/training.md, 'The recipe': each
# default and the official config it comes from); synthetic is a from-scratch quick start tuned to
# finish in minutes on a 2-core CPU.
# -------------------------------------------------------------------------------------------------

# eval_every: 10 (NYUD) and 2 (PASCAL) evaluations in 40,000 steps, few against the training's compute
# (docs/results.md, 'What an evaluation costs'); the last step is always evaluated.
COMMON = dict(backbone='large', batch_size=4, max_iters=40000, lr=2e-5, weight_decay=1e-6, warmup=0,
              augment=True, clip=10.0, eval_every=4000, log_every=20, workers=4, num_experts=8,
              expert_dim=None, taps=None, gate='token', memory_write='replace', ablation='none', seed=0,
              amp='auto', device='auto', pretrained='imagenet', loss_weights={}, edge_pos_weight=0.95,
              accum_steps=1, grad_checkpoint='off', compile=False, eval_workers=None, tasks=None,
              save_predictions=False, baselines=[])
DATASET_DEFAULTS = {
    # NYUD: lr 1e-5, TaskPrompter's ViT-L recipe (configs/nyud/nyud_vitLp16_taskprompter.yml; MLoRE's too)
    'nyud': dict(img_size=[448, 576], data_root='data/NYUDv2', lr=1e-5),
    'pascal': dict(img_size=[512, 512], data_root='data/PASCALContext', eval_every=20000),
    # From scratch in minutes on a CPU (no pretrained weights offline): tiny ViT, narrow experts
    # (expert_dim 64 goes with the tiny backbone: with another, that backbone's width), 96x128 (NYUD's
    # 3:4 camera), more lr with a warm-up, and many scenes rather than many epochs. No augmentation:
    # from scratch and this short it holds depth and normals back. Depth weighs 5 instead of 1: at the
    # paper's weights normals and edges (x10, x50) drive the shared backbone and depth lags
    # (docs/results.md, 'The quick start'). Scenes are generated at the network size.
    'synthetic': dict(img_size=[96, 128], data_root='data/synthetic', backbone='tiny', expert_dim=64,
                      batch_size=8, max_iters=1200, lr=5e-4, warmup=50, augment=False, eval_every=400,
                      log_every=25, workers=1, scenes=[1000, 50], loss_weights={'depth': 5.0}, pretrained='none'),
}
SETTINGS = set(COMMON) | {'dataset', 'data_root', 'img_size', 'scenes'}  # what config.json records of the flags
MODEL_KEYS = ('dataset', 'tasks', 'backbone', 'img_size', 'num_experts', 'expert_dim', 'taps', 'gate', 'memory_write',
              'ablation')
MAX_BAD_STEPS = 5  # consecutive non-finite steps before the run stops
PANELS = 4  # val images drawn after each evaluation
EVAL_BATCH = 8  # images per process and forward pass in evaluation, at least (see shard_loader)


def make_parser():
    """The flags. A setting's flag has no argparse default (absent unless given: resolve_config layers
    the defaults); its help shows each dataset's default where they differ."""
    p = argparse.ArgumentParser(description='Train, evaluate and run TaskExpert (ICCV 2023) on NYUD-v2, '
                                'PASCAL-Context or synthetic scenes. The settings a run used are saved in '
                                'its config.json.', argument_default=argparse.SUPPRESS)
    a = p.add_argument
    a('--dataset', choices=list(DATASET_DEFAULTS), help='synthetic (generated offline), nyud or pascal (default: '
      'synthetic)')
    a('--config', metavar='PATH', default=None, help='a run\'s config.json (or a JSON file of some settings): its '
      'settings are the defaults, the flags given override them')
    a('--data-root', help=f'dataset folder ({shown("data_root")})')
    a('--tasks', nargs='+', metavar='TASK', help='train and evaluate these of the dataset\'s tasks only, e.g. '
      '--tasks depth for a single-task baseline of the same model (default: all of them)')
    a('--backbone', choices=list(VIT_PRESETS), help=f'ViT size ({shown("backbone")})')
    a('--pretrained', metavar='WEIGHTS', help='ImageNet weights of the backbone: imagenet = timm\'s '
      'vit_<backbone>_patch16_384.augreg_in21k_ft_in1k (the authors\' start), fetched once into torch\'s hub cache; '
      'a timm .pth/.bin/.safetensors or Google .npz file; a Hugging Face hub id (owner/name, or a timm name); '
      f'none = from scratch (nyud, pascal default: imagenet = {IMAGENET_WEIGHTS.format("large")} for the large '
      'backbone; synthetic default: none)')
    a('--img-size', type=int, nargs=2, metavar=('H', 'W'),
      help=f'network input size, divisible by 16 ({shown("img_size")})')
    a('--batch-size', type=int, help='global batch of one optimizer step, split over torchrun processes and '
      f'--accum-steps micro-batches ({shown("batch_size")})')
    a('--accum-steps', type=int, help='gradient accumulation: each process runs its share of the batch as N '
      f'micro-batches, for the same step with less memory ({shown("accum_steps")})')
    a('--grad-checkpoint', choices=['off', 'mmoe', 'all'], help='activation checkpointing, less memory for more '
      'compute: mmoe = the MMoE modules (+1 %% FLOPs), all = also the backbone blocks (+17 %% for ViT-L) '
      f'({shown("grad_checkpoint")})')
    a('--compile', action=argparse.BooleanOptionalAction,
      help='torch.compile the ViT blocks and the MMoEs, each in place (the heads stay eager): compiled at the first '
      f'steps, and again for inference at the first evaluation ({shown("compile")})')
    a('--max-iters', type=int, help=f'training iterations ({shown("max_iters")})')
    a('--lr', type=float, help=f'Adam learning rate ({shown("lr")})')
    a('--weight-decay', type=float, help=f'Adam weight decay ({shown("weight_decay")})')
    a('--warmup', type=int, help=f'linear warm-up iterations before the poly decay ({shown("warmup")})')
    a('--augment', action=argparse.BooleanOptionalAction,
      help=f'the training augmentations of ATRC / InvPT: scale, crop, flip, colour ({shown("augment")})')
    a('--clip', type=float, help=f'gradient-norm clip ({shown("clip")})')
    a('--loss-weights', type=task_weight, nargs='+', metavar='TASK=W',
      help='per-task loss weights to change, e.g. depth=2 (default: the paper\'s, NYUD semseg 1 depth 1 '
      'normals 10 edge 50, PASCAL semseg 1 human_parts 2 sal 5 normals 10 edge 50; synthetic: depth 5)')
    a('--edge-pos-weight', type=float, help='weight w of the edge pixels in the edge loss\'s balanced BCE, 1 - w '
      f'that of the others (edge_w of the InvPT / TaskPrompter configs) ({shown("edge_pos_weight")})')
    a('--eval-every', type=int, help='evaluate and save last.pt every N iterations, and at the end '
      f'({shown("eval_every")})')
    a('--log-every', type=int, help=f'print a progress line every N iterations ({shown("log_every")})')
    a('--scenes', type=int, nargs=2, metavar=('TRAIN', 'VAL'),
      help=f'synthetic scenes to generate into --data-root ({shown("scenes")})')
    a('--out-dir', default=None, help='output folder (default: runs/<dataset>; with --resume PATH: its folder)')
    a('--resume', nargs='?', const='', default=None, metavar='PATH',
      help='continue training from a checkpoint (alone: <out-dir>/last.pt); settings come from it')
    a('--rewind', action='store_true', default=False, help='with --resume of a checkpoint before the last step of '
      'its folder (e.g. best.pt while last.pt is later): continue from it there, keeping what it replaces in '
      '<folder>/run_to_step<N>/ (last.pt and later best.* moved, the logs and pictures copied)')
    a('--checkpoint', metavar='PATH', default=None, help='model for --eval-only / --predict, .pt or .safetensors '
      '(default: <out-dir>/best.pt)')
    a('--eval-only', action='store_true', default=False, help='evaluate --checkpoint on the val split and exit')
    a('--save-predictions', action=argparse.BooleanOptionalAction, help='with --eval-only and at a run\'s last '
      'evaluation: write every val image\'s predictions as the offline tools read them (edge/<id>.png for SEISM, '
      f'...) to <out-dir>/val_step<N>/ ({shown("save_predictions")})')
    a('--baselines', nargs='*', metavar='RUN_DIR', help='folders of runs on the same dataset, one per task (the '
      'single-task runs of --tasks): every evaluation also reports Delta_m against their last evaluations; '
      'alone: none (default: none)')
    a('--predict', metavar='DIR_OR_IMAGE', default=None, help='run --checkpoint on your own images: per image a '
      'panel (<name>.png) and the predictions at its size (<name>.npz), <name> the image\'s file name')
    a('--benchmark', action='store_true', default=False, help='count the FLOPs, then time training and inference '
      'on random inputs (--amp, --compile, --grad-checkpoint, --accum-steps select the variant) and exit')
    a('--flops-only', action='store_true', default=False, help='with --benchmark: only count the FLOPs (on the meta '
      'device: instant for any backbone, e.g. ViT-L on a CPU)')
    a('--peak-tflops', type=float, default=None, help='with --benchmark: the dense bf16 peak of your accelerator in '
      'TFLOP/s, for the MFU (default: known for common NVIDIA GPUs)')
    a('--device', help=f'auto (cuda if available), cpu, cuda or cuda:N ({shown("device")})')
    a('--amp', choices=['auto', 'bf16', 'fp16', 'tf32', 'off'], help='training\'s precision on CUDA: auto = bf16 '
      'autocast where supported, else fp16 with a GradScaler; tf32 = fp32 with TF32 matmuls and convolutions (the '
      f'authors\' on Ampere); off = fp32; auto on a CPU: fp32. Evaluation is fp32 whatever --amp ({shown("amp")})')
    a('--seed', type=int, help=f'seed of initialisation, data order and augmentations ({shown("seed")})')
    a('--workers', type=int, help=f'data-loading processes per training process ({shown("workers")})')
    a('--eval-workers', type=int, help='processes scoring boundaries during evaluation, per training process '
      '(default: this process\'s share of the CPUs available, less its --workers and itself, at least 1; 0: in the '
      'training process)')
    a('--num-experts', type=int, help=f'experts E per MMoE ({shown("num_experts")})')
    a('--expert-dim', type=int, help='expert width D (default: by backbone, 256 tiny and small, 512 base, 768 '
      'large; synthetic 64, which goes with its tiny backbone: with another --backbone, that backbone\'s)')
    a('--taps', type=int, nargs='+', metavar='BLOCK', help='1-based backbone blocks carrying an MMoE '
      '(default: 4 evenly spaced, e.g. 6 12 18 24 for large; with an --ablation the last of them)')
    a('--gate', choices=['token', 'image'], help=f'gate softmax per token or per image ({shown("gate")})')
    a('--memory-write', choices=['replace', 'add'], help='memory write M <- F (replace) or M + F (add) '
      f'({shown("memory_write")})')
    a('--ablation', choices=list(ABLATIONS), help='parts to remove, to measure what they buy: none = the full '
      'model, no-memory = one MMoE at the last tap, gates over its experts, static = no gates either: every '
      f'task reads the mean of the last tap\'s experts ({shown("ablation")})')
    p.error = lambda msg: fail(f'{msg} (see --help)')  # one line, not argparse's usage block
    return p


def shown(key):
    """A setting's default for --help: 'default: 4', or per dataset where they differ ('default: nyud
    1e-05, pascal 2e-05, synthetic 0.0005')."""
    rows = {d: {**COMMON, **row} for d, row in DATASET_DEFAULTS.items()}
    text = {d: ' '.join(map(str, r[key])) if isinstance(r[key], list) else str(r[key])
            for d, r in rows.items() if key in r}
    if len(set(text.values())) == 1:
        return f'default: {next(iter(text.values()))}'
    return 'default: ' + ', '.join(f'{d} {v}' for d, v in text.items())


def task_weight(text):
    """'depth=5' -> ('depth', 5.0), for --loss-weights."""
    task, _, weight = text.partition('=')
    try:
        return task, float(weight)
    except ValueError:
        raise argparse.ArgumentTypeError(f'{text!r} is not TASK=WEIGHT (e.g. depth=2)') from None


def fail(msg):
    """Stop with one line on stderr and exit status 1."""
    raise SystemExit(f'train.py: error: {msg}')


def parse_args(argv=None):
    """argv -> the command, parsed once: the settings given as flags (a setting not given is absent),
    the other flags with their defaults, and args.from_file: the --config file's settings, if any."""
    args = make_parser().parse_args(argv)
    args.from_file = read_config_file(args.config) if args.config else {}
    return args


def given_settings(args):
    """The settings given: the --config file's, then the flags' (name -> value). A file of another
    dataset's run (a synthetic run's config.json with --dataset nyud) lends no data_root or scenes."""
    flags = {k: v for k, v in vars(args).items() if k in SETTINGS}
    from_file = args.from_file
    if 'dataset' in flags and from_file.get('dataset', flags['dataset']) != flags['dataset']:
        from_file = {k: v for k, v in from_file.items() if k not in ('data_root', 'scenes')}
    return {**from_file, **flags}


def setting_name(args):
    """-> name(setting): how an error names it: its flag, or the --config file that gave it."""
    from_file = set(args.from_file) - set(vars(args))
    return lambda k: f'--config {args.config}: {k}' if k in from_file else flag(k)


def flag(k):
    return '--' + k.replace('_', '-')


def read_config_file(path):
    """--config PATH: a run's config.json, or a JSON object of some of its settings -> those settings
    (not its out_dir: a run writes to its own --out-dir). Each is checked as its flag is: its value as
    the flag's strings, parsed by the flags' own parser (type, choices, count); a setting unknown, of
    another shape or a bad value stops with one line naming the file and the setting."""
    try:
        with open(path) as f:
            settings = json.load(f)
    except OSError as e:
        fail(f'--config {path}: cannot read it ({e.strerror or e}): pass the config.json of a run, or a JSON file of '
             f'settings')
    except ValueError as e:
        fail(f'--config {path}: not JSON ({e})')
    if not isinstance(settings, dict):
        fail(f'--config {path}: holds a {type(settings).__name__}, not an object of settings')
    settings.pop('out_dir', None)
    parser = make_parser()
    actions = {a.dest: a for a in parser._actions}
    for k, v in settings.items():
        if k not in SETTINGS:
            fail(f'--config {path}: unknown setting {k!r}; settings are spelt as in config.json (e.g. max_iters)')
        where = f'--config {path}: {k} = {json.dumps(v)}'
        if v is None and k in COMMON and COMMON[k] is None:  # (null: the default, as without the setting)
            continue
        if v is None:
            fail(f'{where}: a value is needed (leave the setting out for its default)')
        parser.error = lambda msg: fail(f'{where} ({msg})')  # (used at once, in this iteration)
        settings[k] = vars(parser.parse_args(as_flags(actions[k], v, where))).get(k, v)
    if 'loss_weights' in settings:
        settings['loss_weights'] = dict(settings['loss_weights'])  # (as the flag parses it: (task, weight) pairs)
    return settings


def as_flags(action, v, where):
    """A --config setting's JSON value -> the strings of its flag (argparse's `action`), or one line
    when its shape is another: true / false, a list (nargs), an object of task weights, one value."""
    name = action.option_strings[0]
    if isinstance(action, argparse.BooleanOptionalAction):
        if not isinstance(v, bool):
            fail(f'{where}: not true or false')
        return [name if v else '--no-' + name[2:]]
    if action.type is task_weight:
        if not isinstance(v, dict):
            fail(f'{where}: not an object of task weights (e.g. {{"depth": 2}})')
        return [name, *[f'{t}={w}' for t, w in v.items()]] if v else []
    scalar = lambda x: x is not None and not isinstance(x, (bool, list, dict))  # noqa: E731
    if action.nargs is None:
        if not scalar(v):
            fail(f'{where}: not a single value')
        return [f'{name}={v}']
    if not isinstance(v, list) or not all(map(scalar, v)):
        fail(f'{where}: not a list of values (e.g. {json.dumps([v])})')
    return [name, *map(str, v)]


def resolve_config(args, ckpt_config=None):
    """The settings of a run (parse_args' args), layered here and only here: COMMON < the dataset's row
    < a --config file < the flags given. A run from a checkpoint (--resume, --eval-only, --predict)
    starts from its config instead: COMMON < the checkpoint's < the file < the flags; its model settings
    cannot change, its training settings can (e.g. --max-iters to extend it). The result is what
    config.json and every checkpoint hold; TaskExpert.from_config reads its MODEL_KEYS."""
    given = given_settings(args)
    tasks = given.get('tasks')  # the file's loss weights of the run's tasks, then those of the flags
    weights = {**{t: w for t, w in args.from_file.get('loss_weights', {}).items() if tasks is None or t in tasks},
               **dict(vars(args).get('loss_weights', []))}
    given.pop('loss_weights', None)  # (the ones given change the defaults, one by one)
    if ckpt_config is not None:
        if 'tasks' in given:
            given['tasks'] = task_list(ckpt_config['dataset'], given['tasks'])
        changed = [k for k in MODEL_KEYS if k in given and given[k] != ckpt_config[k]]
        if changed:
            fail(f'{setting_name(args)(changed[0])} {given[changed[0]]} differs from the checkpoint\'s '
                 f'{ckpt_config[changed[0]]}: model settings cannot change when loading a checkpoint')
        # (a training setting newer than the checkpoint takes its default: the behaviour of that train.py)
        return {**COMMON, **ckpt_config, **given, 'loss_weights': {**ckpt_config['loss_weights'], **weights}}
    dataset = given.get('dataset', 'synthetic')
    row = DATASET_DEFAULTS[dataset]
    if given.get('backbone', row.get('backbone')) != row.get('backbone'):
        row = {k: v for k, v in row.items() if k != 'expert_dim'}  # a row's expert width goes with its backbone
    cfg = {**COMMON, **row, **given, 'dataset': dataset}  # (config.json's order)
    cfg['tasks'] = task_list(dataset, cfg['tasks'])
    defaults = {**{t: TASK_TABLE[t].loss_weight for t in TASKS[TASK_SET[dataset]]}, **row.get('loss_weights', {})}
    cfg['loss_weights'] = {**{t: w for t, w in defaults.items() if t in cfg['tasks']}, **weights}
    # the defaults that depend on the backbone, written out so config.json is complete
    cfg['expert_dim'] = cfg['expert_dim'] or VIT_PRESETS[cfg['backbone']]['expert_dim']
    cfg['taps'] = list(cfg['taps'] or default_taps(cfg['backbone'], cfg['ablation']))
    cfg['img_size'] = list(cfg['img_size'])
    if cfg['pretrained'] == 'imagenet':
        cfg['pretrained'] = IMAGENET_WEIGHTS.format(cfg['backbone'])
    return cfg


def task_list(dataset, names):
    """--tasks on `dataset` -> those of its tasks, in the dataset's order (None: all of them)."""
    known = TASKS[TASK_SET[dataset]]
    for t in names or ():
        if t not in known:
            fail(f'--tasks {t}: {dataset} has no task {t}; its tasks are {", ".join(known)}')
    return [t for t in known if names is None or t in names]


def check_config(cfg, training=True, name=flag):
    """Reject bad settings with one line, before anything is written; name(setting): its flag, or the
    --config file that gave it (setting_name). The model's own settings are checked by the model
    (built on the meta device: no memory, no time). training=False (evaluation, prediction): the
    batch need not split into micro-batches."""
    try:
        with torch.device('meta'):
            TaskExpert.from_config(cfg)
    except ValueError as e:  # '<option> <value>: ...' -> '--<option> <value>: ...'
        option, _, rest = str(e).partition(' ')
        fail(f'{name(option)} {rest}')
    for k in ('batch_size', 'max_iters', 'eval_every', 'log_every', 'accum_steps'):
        if cfg[k] < 1:
            fail(f'{name(k)} {cfg[k]}: must be at least 1')
    world = int(os.environ.get('WORLD_SIZE', 1))  # torchrun processes
    if training and cfg['batch_size'] % (world * cfg['accum_steps']):
        fail(f'{name("batch_size")} {cfg["batch_size"]} must split evenly into {world} process(es) x --accum-steps '
             f'{cfg["accum_steps"]} micro-batches')
    for k in ('lr', 'clip'):  # (comparisons written so that NaN fails them)
        if not 0 < cfg[k] < math.inf:
            fail(f'{name(k)} {cfg[k]}: must be a positive, finite number')
    for k in ('weight_decay', 'warmup', 'workers'):
        if not 0 <= cfg[k] < math.inf:
            fail(f'{name(k)} {cfg[k]}: must be a finite number >= 0')
    if not 0 <= cfg['seed'] < 2 ** 63:  # torch.manual_seed(seed + rank) takes 64 bits
        fail(f'{name("seed")} {cfg["seed"]}: must be in 0 .. 2^63 - 1')
    if not 0 < cfg['edge_pos_weight'] < 1:
        fail(f'{name("edge_pos_weight")} {cfg["edge_pos_weight"]}: must be between 0 and 1')
    if (cfg['eval_workers'] or 0) < 0:
        fail(f'{name("eval_workers")} {cfg["eval_workers"]}: must not be negative')
    for t, w in cfg['loss_weights'].items():
        if t not in cfg['tasks'] or not 0 <= w < math.inf:
            fail(f'{name("loss_weights")} {t}={w}: needs a task of this {cfg["dataset"]} run '
                 f'({", ".join(cfg["tasks"])}) and a weight >= 0')
    if 'scenes' in cfg and cfg['dataset'] != 'synthetic':
        fail(f'{name("scenes")} applies to --dataset synthetic only')
    if cfg['dataset'] == 'synthetic' and min(cfg['scenes']) < 1:
        fail(f'{name("scenes")} {cfg["scenes"][0]} {cfg["scenes"][1]}: both must be at least 1')


# -------------------------------------------------------------------------------------------------
# Starting a run: checks, data, weights, the Run, the run folder; on resume, the unfinished evaluation
# -------------------------------------------------------------------------------------------------

@dataclasses.dataclass
class Run:
    """What the steps and the evaluations of one training run share."""
    cfg: dict  # the settings (resolve_config), cfg['out_dir'] included
    model: TaskExpert  # the model itself: evaluations and checkpoints read it
    trained: torch.nn.Module  # what trains: the model, or DDP around it
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler  # enabled under fp16 only; disabled, its calls pass through
    loss_fn: MultiTaskLoss
    device: torch.device
    amp_dtype: torch.dtype = None  # the autocast dtype, None for fp32
    world: int = 1  # torchrun processes
    val_loader: torch.utils.data.DataLoader = None  # this process's share of the val split (shard_loader)
    pool: data.EdgePool = None  # the boundary metric's worker processes, or None
    board: object = None  # rank 0's TensorBoard SummaryWriter
    best: dict = None  # the best evaluation so far, as best.pt records it

    def save(self, name, step, rng, best=None):
        """The full training state of `step` as <out-dir>/<name> (taskexpert.save_checkpoint)."""
        save_checkpoint(os.path.join(self.cfg['out_dir'], name), model=self.model, optimizer=self.optimizer,
                        scaler=self.scaler, step=step, rng=rng, config=self.cfg, best=best)


def start(cfg, device, world, rank, resume, pool):
    """Everything before the first step, in the order that loses nothing (run_mode checked the output
    folder): the datasets opened, the ImageNet weights fetched, every data file read, the Run built, its
    first lines logged, the run folder opened and, on resume, the checkpoint's evaluation finished.
    -> (the Run, the training dataset, the first step)."""
    path, ckpt = resume or (None, None)
    amp_dtype, use_scaler, why = pick_precision(cfg['amp'], device)
    train_ds, val_ds = open_datasets(cfg, check=False)  # its files are there: the weights next, then every file read
    pretrained = None if ckpt else fetch_pretrained(cfg)
    check_datasets(cfg, (train_ds, val_ds))
    if len(train_ds) < cfg['batch_size']:
        fail(f'{cfg["data_root"]}: {len(train_ds)} training images, fewer than --batch-size {cfg["batch_size"]}')
    if pool:
        pool.start()  # the data is good: the boundary workers start while the model trains
    run = build(cfg, device=device, world=world, rank=rank, amp_dtype=amp_dtype, use_scaler=use_scaler,
                pretrained=pretrained, resume=resume)
    run.val_loader, run.pool, step = shard_loader(val_ds, cfg, world, rank), pool, ckpt['step'] if ckpt else 0
    log_start(run, (train_ds, val_ds), why, step, pretrained)
    if is_main():
        open_run_folder(run, step, path)
    if ckpt is not None:
        finish_checkpoint(run, step, ckpt['rng'])
    return run, train_ds, step


def finish_checkpoint(run, step, rng):
    """On resume: the evaluation of the checkpoint's step, which a kill may have cut short (at an
    evaluation step last.pt is saved first, then the model evaluated and reported, then best.*). When
    metrics.jsonl already holds it, the kill came after its report: its logged scores are used, the
    model is not evaluated again. best.* and curves.png are brought up to date either way."""
    logged = [logged_scores(run.cfg['out_dir'], step, run.model.tasks) if is_main() else None]
    if run.world > 1:  # every process takes part in an evaluation: all follow rank 0's metrics.jsonl
        dist.broadcast_object_list(logged, 0)
    finish_evaluation(run, step, rng, scores=logged[0])


def startup_warnings(cfg, device, world):
    """Settings known to train slowly or differently from what was likely meant -> lines to print."""
    lines = []
    micro = cfg['batch_size'] // (world * cfg['accum_steps'])  # images per process and forward pass
    synced = device.type == 'cuda' and world > 1  # SyncBatchNorm: statistics over all processes
    if micro * (world if synced else 1) == 1:
        lines.append(f'the heads\' BatchNorm normalises each image with its own statistics (--batch-size '
                     f'{cfg["batch_size"]} over {world} process(es) x --accum-steps {cfg["accum_steps"]}): '
                     'noisy, and unlike the running statistics used in evaluation; use a larger batch or fewer '
                     'micro-batches (--grad-checkpoint saves memory instead)')
    if world > 1 and device.type == 'cpu':
        lines.append('DDP on CPUs (gloo): each process normalises BatchNorm over its own images (SyncBatchNorm '
                     'needs CUDA), and it is slow: meant for testing')
    cores = os.cpu_count() or 1
    if world * cfg['workers'] > cores:
        lines.append(f'{world} process(es) x --workers {cfg["workers"]} data loaders on {cores} CPU cores: '
                     'data loading competes with itself; lower --workers')
    return lines


def fetch_pretrained(cfg):
    """A fresh run's ImageNet checkpoint (--pretrained) as a local file, or None: fetched once, by the
    first process of each machine, before anything is written; a missing one stops with one line."""
    if cfg['pretrained'] == 'none':
        return None
    first = int(os.environ.get('LOCAL_RANK', 0)) == 0
    if dist.is_initialized() and not first:
        dist.barrier()  # the first process fetches it into the shared cache
    try:
        path = pretrained_file(cfg['pretrained'])
    except FileNotFoundError as e:
        fail(f'--pretrained: {e}')
    if dist.is_initialized() and first:
        dist.barrier()
    return path


def load_imagenet(model, path):
    """taskexpert.load_pretrained(model, path), its errors as one line naming the file."""
    try:
        load_pretrained(model, path)
    except (KeyError, ValueError, FileNotFoundError) as e:  # its one-line messages name the file
        fail(f'--pretrained: {e.args[0]}')
    except Exception as e:  # a damaged file: whatever its reader (zip, pickle, safetensors) raises
        why = str(e).strip().split('\n')[0].split('. ')[0]
        fail(f'--pretrained {path}: cannot read it ({type(e).__name__}{": " * bool(why)}{why}); download it again')


def restore(model, optimizer, scaler, resume, rank):
    """The state of resume = (path, checkpoint): the weights, Adam's state (its moments; its settings
    stay the run's, e.g. --weight-decay), the GradScaler's and this process's RNG states."""
    path, ckpt = resume
    loaded(lambda p: load_weights(model, ckpt['model'], p), path)
    settings = [{k: v for k, v in g.items() if k != 'params'} for g in optimizer.param_groups]
    optimizer.load_state_dict(ckpt['optimizer'])  # (which also loads the checkpoint's group settings)
    for group, own in zip(optimizer.param_groups, settings):
        group.update(own)
    if ckpt['scaler']:  # empty when saved without fp16: an fp16 resume starts from a fresh scale
        scaler.load_state_dict(ckpt['scaler'])
    set_rng_state(ckpt['rng'][rank % len(ckpt['rng'])])


def log_start(run, datasets, why, step, pretrained):
    """The run's first lines: data, devices, precision, size, warnings, weights, the settings."""
    cfg, model = run.cfg, run.model
    n_params = sum(p.numel() for p in model.parameters())
    n_trained = sum(p.numel() for p in model.parameters() if p.requires_grad)
    log(f'TaskExpert on {cfg["dataset"]} ({cfg["data_root"]}: {len(datasets[0])} train / {len(datasets[1])} val images)')
    log(f'device {run.device} x {run.world} process(es) | precision: {why} | '
        f'{n_params / 1e6:.1f}M parameters ({n_trained / 1e6:.1f}M trained)')
    for line in startup_warnings(cfg, run.device, run.world):
        log(f'warning: {line}')
    if step:
        log(f'resuming at step {step} of {cfg["max_iters"]}')
    elif pretrained:
        log(f'backbone: ImageNet weights {cfg["pretrained"]} ({pretrained})')
    elif cfg['dataset'] != 'synthetic':
        log('note: --pretrained none: training from scratch, far below the paper (ImageNet ViT init)')
    log('config ' + json.dumps(cfg))


# -------------------------------------------------------------------------------------------------
# Resuming exactly: every process's RNG states go into the checkpoint (its format: taskexpert.py). The
# data order of a step comes from (seed, epoch) and each sample's augmentation from (seed, epoch, sample
# index), never from a global stream: a resumed run sees the batches of an uninterrupted one.
# -------------------------------------------------------------------------------------------------

def rng_state():
    """This process's RNG states as tensors and plain data (weights_only-loadable)."""
    _, keys, pos, has_gauss, gauss = np.random.get_state()
    version, state, gauss_next = random.getstate()
    return {'torch': torch.get_rng_state(),
            'cuda': torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            'numpy': {'keys': torch.from_numpy(keys.astype(np.int64)), 'pos': int(pos),
                      'has_gauss': int(has_gauss), 'gauss': float(gauss)},
            'python': [version, list(state), gauss_next]}


def set_rng_state(s):
    torch.set_rng_state(s['torch'])
    if s['cuda'] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(s['cuda'][:torch.cuda.device_count()])
    n = s['numpy']
    np.random.set_state(('MT19937', n['keys'].numpy().astype(np.uint32), n['pos'], n['has_gauss'], n['gauss']))
    version, state, gauss_next = s['python']
    random.setstate((version, tuple(state), gauss_next))


def loaded(read, path):
    """read(path), read_checkpoint or TaskExpert.from_checkpoint, with its exception as the one-line error."""
    try:
        return read(path)
    except (OSError, ValueError) as e:
        fail(str(e))


# -------------------------------------------------------------------------------------------------
# Data: the datasets (data.py; their loaders: data.train_loader, data.eval_loader)
# -------------------------------------------------------------------------------------------------

def open_datasets(cfg, splits=('train', 'val'), check=True):
    """The splits of cfg['dataset'] as data.py datasets, every file read once if `check` (check_datasets);
    a missing dataset stops with the download help, a folder of another dataset with one line. The
    synthetic scenes are generated once, at the network size, into the data folder."""
    root, size, dataset = cfg['data_root'], tuple(cfg['img_size']), cfg['dataset']
    found = data.layout(root)  # a synthetic folder is in the NYUD layout: --dataset nyud reads it too
    if found not in (None, dataset) and (found, dataset) != ('synthetic', 'nyud'):
        fail(f'--data-root {root} holds {data.LAYOUTS[found][1]}, not --dataset {dataset}\'s files: pass '
             f'--dataset {found}, or another --data-root')
    if dataset == 'synthetic':
        if is_main():
            data.write_synthetic(cfg)
        if dist.is_initialized():
            dist.barrier()
    try:
        sets = [data.READERS[cfg['dataset']](root, split=s, train=s == 'train' and cfg['augment'], size=size,
                                             tasks=cfg['tasks'], seed=cfg['seed']) for s in splits]
    except DataError as e:
        if not os.path.isdir(root) or 'split file not found' in str(e):
            print(f'train.py: error: {cfg["dataset"]} data not found at {root} (--data-root)\n{data.DOWNLOAD_HELP}',
                  file=sys.stderr)
            raise SystemExit(1)
        fail(str(e))
    if check:
        check_datasets(cfg, sets)
    return sets


def check_datasets(cfg, sets):
    """Every file of the datasets read once, as training and evaluation will (each process its share):
    a bad one stops the run with one line before its first step (data.py, _MultiTaskDataset.check)."""
    share = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    for ds in sets:
        ds.check(cfg['workers'], *share)


def to_device(batch, device, keep=()):
    """A batch's tensors on `device` (asynchronous from the loader's pinned memory), those named in keep left."""
    return {k: v if k == 'meta' or k in keep else v.to(device, non_blocking=True) for k, v in batch.items()}


# -------------------------------------------------------------------------------------------------
# Devices, precision, processes
# -------------------------------------------------------------------------------------------------

def is_main():
    return not dist.is_initialized() or dist.get_rank() == 0


def log(*a, **k):
    if is_main():
        print(*a, **k, flush=True)


def pick_device(name):
    """--device -> torch.device; on a GPU also this process's CUDA settings."""
    local_rank = int(os.environ.get('LOCAL_RANK', 0))
    if name in (None, 'auto'):
        name = 'cuda' if torch.cuda.is_available() else 'cpu'
    if name.startswith('cuda'):
        if not torch.cuda.is_available():
            fail(f'--device {name}: CUDA is not available here; use --device cpu')
        if name == 'cuda':  # one GPU per torchrun process
            name = f'cuda:{local_rank}'
        device = torch.device(name)
        if device.index >= torch.cuda.device_count():
            fail(f'--device {name}: this machine has {torch.cuda.device_count()} GPU(s); '
                 'run at most that many processes (torchrun --nproc_per_node)')
        # the current device too, so that kernels, NCCL and cached allocations all land on ours
        torch.cuda.set_device(device)
        torch.backends.cudnn.benchmark = True  # one input size throughout: pick the fastest kernels once
        return device
    if name != 'cpu':
        fail(f'--device {name}: choose auto, cpu, cuda or cuda:N')
    return torch.device(name)


def pick_precision(amp, device):
    """-> (autocast dtype or None, use a GradScaler, why) for --amp on this device. On CUDA it also sets
    how fp32 matmuls and convolutions run (set_fp32_precision): TF32 under --amp tf32, else IEEE fp32."""
    amp = amp or 'auto'
    if device.type == 'cuda':
        # bf16 (and TF32) tensor cores from compute capability 8.0 (Ampere) on. torch.cuda.is_bf16_supported()
        # also says yes on a V100 or T4, where bf16 is only emulated and cuDNN has no bf16 convolutions.
        ampere = torch.cuda.get_device_capability(device) >= (8, 0)
        if amp in ('bf16', 'tf32') and not ampere:
            fail(f'--amp {amp}: this GPU does not support {amp}; use --amp fp16, off or auto')
        set_fp32_precision('tf32' if amp == 'tf32' else 'ieee')
        if amp == 'tf32':
            return None, False, 'fp32, its matmuls and convolutions in TF32 (--amp tf32)'
        if amp == 'off':
            return None, False, 'fp32 (--amp off)'
        if amp == 'fp16' or (amp == 'auto' and not ampere):
            why = '--amp fp16' if amp == 'fp16' else 'this GPU has no bf16'
            return torch.float16, True, f'fp16 autocast + GradScaler ({why})'
        return torch.bfloat16, False, 'bf16 autocast (' + ('--amp bf16)' if amp == 'bf16' else 'the GPU supports bf16)')
    if amp in ('fp16', 'tf32'):
        fail(f'--amp {amp} needs a CUDA device; on the CPU use --amp off or bf16')
    if amp == 'bf16':
        return torch.bfloat16, False, 'bf16 autocast on the CPU (--amp bf16)'
    return None, False, 'fp32 (CPU: no autocast)' + (' (--amp off)' if amp == 'off' else '')


def autocast(device, dtype):
    return torch.autocast(device.type, dtype=dtype, enabled=dtype is not None)


def set_fp32_precision(precision):
    """How CUDA runs fp32 matmuls and convolutions: 'ieee' (fp32 itself) or 'tf32' (tensor cores reading
    10 of the 23 mantissa bits, as cuDNN convolutions do by default, and as the authors' torch 1.10 did
    for matmuls too on Ampere). Through the fp32_precision API of torch >= 2.9: its legacy allow_tf32
    flags are deprecated, and reading them once this API is used raises."""
    torch.backends.cuda.matmul.fp32_precision = precision
    torch.backends.cudnn.conv.fp32_precision = precision


@contextlib.contextmanager
def fp32_precision(precision):
    """set_fp32_precision(precision) for the block, the settings before it restored after."""
    before = torch.backends.cuda.matmul.fp32_precision, torch.backends.cudnn.conv.fp32_precision
    set_fp32_precision(precision)
    try:
        yield
    finally:
        torch.backends.cuda.matmul.fp32_precision, torch.backends.cudnn.conv.fp32_precision = before


def compile_regions(model):
    """--compile: each ViT block and each MMoE compiled in place (torch.compile of its forward). The blocks
    share one compiled graph (as do the MMoEs after the first), so compiling takes seconds, not minutes;
    the heads stay eager, and with them SyncBatchNorm, on which a whole-model graph would break."""
    for module in [*model.backbone.blocks, *model.mmoe]:
        module.compile()


# -------------------------------------------------------------------------------------------------
# Several processes: one per GPU (nccl) or CPU worker (gloo), started by torchrun or by any launcher
# that sets WORLD_SIZE, RANK, LOCAL_RANK, MASTER_ADDR and MASTER_PORT; and how they stop together
# -------------------------------------------------------------------------------------------------

# The longest a process waits in a collective before the run stops: rank 0 saving ViT-L's checkpoints
# (5.6 GB) or fetching the ImageNet weights (1.2 GB) while the others wait.
PG_TIMEOUT = datetime.timedelta(minutes=15)


def setup_distributed(device_flag):
    """-> (device, processes, rank). With several processes, the process group over the launcher's
    key-value store, and a thread that watches the others (Peers)."""
    world = int(os.environ.get('WORLD_SIZE', 1))
    device = pick_device(device_flag)
    if world == 1:
        return device, 1, 0
    store, rank, world = next(dist.rendezvous('env://', timeout=PG_TIMEOUT))  # (what init_process_group does)
    # device_id: nccl sets up its communicator now, on this process's GPU
    dist.init_process_group('nccl' if device.type == 'cuda' else 'gloo', store=dist.PrefixStore('default_pg', store),
                            rank=rank, world_size=world, timeout=PG_TIMEOUT,
                            device_id=device if device.type == 'cuda' else None)
    PEERS.watch(store, rank)
    return device, world, rank


class Peers:
    """How the processes of a run stop together when one fails, in seconds and with one line each,
    under any launcher. The first to fail writes its rank and error under KEY in the launcher's
    key-value store (stop). A thread of every process waits for that key (wait), then aborts the
    process group, so that a collective waiting for the failed process returns with an error (nccl;
    under gloo, the failed process's closed sockets do that), which the main thread turns into one line
    naming the failed process (stop). A process still running GRACE seconds later prints that line and
    exits. A process that ends its work sets the key to 'done' (finish), which ends the waits."""
    KEY = f'taskexpert/failed/{os.environ.get("TORCHELASTIC_RESTART_COUNT", 0)}'  # (per torchrun restart)
    GRACE = 10

    def __init__(self):
        self.store, self.rank, self.failed, self.stopping = None, 0, None, False  # failed: (rank, error)
        self.ended = threading.Event()  # the key was set to 'done', or by this process

    def watch(self, store, rank):
        self.store, self.rank = store, rank
        threading.Thread(target=self.wait, args=(store.host, store.port), daemon=True, name='peers').start()

    def wait(self, host, port):
        """The watching thread, on its own connection to the store (a client waiting for a key blocks others)."""
        try:
            store = dist.TCPStore(host, port, is_master=False, timeout=datetime.timedelta(days=365))
        except dist.DistError:  # (unreachable from here: the run goes on unwatched)
            return
        try:
            rank, _, error = store.get(self.KEY).decode().partition(' ')  # (get waits for the key)
        except dist.DistError:  # the store closed: without torchrun rank 0 holds it, and it ended
            rank, error = '0', 'its process ended without a word (killed?)'
        if rank in ('done', str(self.rank)):
            return self.ended.set()
        self.failed = int(rank), error
        with contextlib.suppress(Exception):  # (already destroyed, when this process is ending anyway)
            dist.group.WORLD.abort()
        time.sleep(self.GRACE)
        if not self.stopping:  # stuck outside any collective
            print(f'train.py: error: {self.line()}', file=sys.stderr, flush=True)
        for child in multiprocessing.active_children():  # data loaders, boundary workers
            child.terminate()
        os._exit(1)

    def line(self):
        return f'rank {self.failed[0]} failed: {self.failed[1]}; rank {self.rank} stopped with it'

    def stop(self, error):
        """The main thread's error path: tell the other processes (the first failure is the one named), abort
        the process group; if another process failed first, stop with the one line that names it. An
        interruption (Ctrl-C, SIGTERM) is not told: a launcher sends it to every process."""
        self.stopping = True
        if self.failed is None and not isinstance(error, KeyboardInterrupt):
            with contextlib.suppress(dist.DistError):  # (its store is gone if rank 0 held it and ended)
                first = self.store.compare_set(self.KEY, '', f'{self.rank} {one_line(error)}').decode()
                rank, _, first = first.partition(' ')
                if rank not in ('done', str(self.rank)):
                    self.failed = int(rank), first
        if dist.is_initialized():
            dist.distributed_c10d._abort_process_group()  # (no destroy: its shutdown could wait for the failed)
        if self.failed and not isinstance(error, SystemExit):  # (this process's own one-line error stays)
            fail(self.line())
        if 'Connection closed by peer' in str(error):  # gloo: a process died without telling
            fail(f'another process of the run ended without a word (killed?): rank {self.rank} stopped with it')

    def finish(self):
        """This process's work is done: the watching threads of all stop (a failure told first stays). Not
        when another process said so already: it may have ended since, and with it (rank 0) the store."""
        if self.store is not None and not self.ended.is_set():
            self.store.compare_set(self.KEY, '', 'done')


PEERS = Peers()  # this process's


def one_line(error):
    """An exception as one line: a fail() message without its 'train.py: error: ', else 'Type: first line'."""
    if isinstance(error, SystemExit):
        return str(error.code).removeprefix('train.py: error: ') if isinstance(error.code, str) else 'see its output'
    return f'{type(error).__name__}: {(str(error).strip().splitlines() or [""])[0]}'


# -------------------------------------------------------------------------------------------------
# The training steps: the skip rule's test, the progress lines
# -------------------------------------------------------------------------------------------------

def why_skipped(run, total, grad_norm, per_task):
    """train_step's skip rule -> why the step is not applied, or None. The step's one host-device sync:
    every process decides alike (the gradient norm is global, the loss flags all-reduced)."""
    finite = torch.stack([total, grad_norm.float()]).isfinite().float()
    if run.world > 1:
        dist.all_reduce(finite, op=dist.ReduceOp.MIN)
    loss_ok, grad_ok = finite.tolist()
    if not loss_ok:
        bad_tasks = ([t for t, v in per_task.items() if not torch.isfinite(v)] or
                     ['another process' if run.world > 1 else 'the weighted sum of the tasks'])
        return f'non-finite loss in {", ".join(bad_tasks)}'
    if not grad_ok and not run.scaler.is_enabled():  # (under fp16 the GradScaler's step skips it)
        return 'non-finite gradient norm'
    return None


class LossLog:
    """The losses of the steps since the last progress line: their sums stay on the device (no wait
    for it in the loop) and are read once per line, as the mean over the processes (all-reduced there,
    not at every step), printed, appended to train.jsonl and TensorBoard."""

    def __init__(self):
        self.t0, self.steps, self.sums = time.time(), 0, {}

    def add(self, total, per_task):
        self.steps += 1
        for t, v in [('loss', total)] + list(per_task.items()):
            self.sums[t] = self.sums.get(t, 0.0) + v

    def report(self, run, step, lr):
        cfg = run.cfg
        # every process took the same steps (the skip rule decides alike): the sums and the seconds of all,
        # divided by the processes, are the global batch's mean losses and the mean time of a step
        sums = torch.stack([*self.sums.values(), torch.tensor(time.time() - self.t0, device=run.device)]).double()
        if run.world > 1:
            dist.all_reduce(sums)
        *sums, dt = (sums / run.world).tolist()
        rec = {'step': step, **{t: v / self.steps for t, v in zip(self.sums, sums)}, 'lr': lr,
               'img_s': self.steps * cfg['batch_size'] / dt}
        eta = (cfg['max_iters'] - step) * dt / self.steps
        log(f'step {step}/{cfg["max_iters"]} loss {rec["loss"]:.4f} (' +
            ' '.join(f'{t} {v:.4f}' for t, v in rec.items() if t not in ('step', 'loss', 'lr', 'img_s')) +
            f') lr {lr:.2e} {rec["img_s"]:.1f} img/s eta {datetime.timedelta(seconds=round(eta))}')
        if is_main():
            add_scalars(run.board, step, {'train': {k: v for k, v in rec.items() if k != 'step'}})
            run.board.flush()
            append_jsonl(os.path.join(cfg['out_dir'], 'train.jsonl'), rec)
        self.t0, self.steps, self.sums = time.time(), 0, {}


# -------------------------------------------------------------------------------------------------
# The run folder and its logs
# -------------------------------------------------------------------------------------------------

# The files a run writes into its folder (and keeps there, --rewind): any of them makes the folder that run's
RUN_FILES = re.compile(r'(last|best)\.pt|best\.safetensors|(train|metrics)\.jsonl|events\.out\.tfevents\..*|'
                       r'curves\.png|gates\.png|vis|val_step\d+|run_to_step\d+(_\d+)?')


def check_out_dir(out, resume=None, step=None, rewind=False):
    """Rank 0, holding the folder's lock: a run writes where it overwrites nobody's files. A resumed run
    into its checkpoint's own folder, from its latest step (or, --rewind, an earlier one); any run into
    a new or empty folder, or one of a run that wrote nothing but its config.json; never into a folder
    of another run (any file of RUN_FILES there: a checkpoint, a log, events, pictures), or of other
    files."""
    if resume and os.path.samefile(os.path.dirname(os.path.abspath(resume)), out):
        latest = latest_step(out, resume, step)
        if latest is not None and step > latest:  # (e.g. a copy of another run's checkpoint)
            fail(f'--resume {resume}: its step {step} is past the run in {out} (step {latest}), whose files it would '
                 'mix with its own: continue it in a new folder, --out-dir NEW')
        if latest is not None and step < latest and not rewind:
            fail(f'--resume {resume}: its step {step} is not the latest of {out} (step {latest}): continuing from it '
                 f'would replace what the run did after it (last.pt, the logs after step {step}); pass --rewind to '
                 f'continue from it there anyway (that is kept, in {out}/run_to_step{latest}), or --out-dir NEW')
        return
    names = sorted(set(os.listdir(out)) - {'train.lock'})
    files = [re.sub(r'^\.(.+)\.tmp\d+$', r'\1', n) for n in names]  # (atomic_write's temporaries: of their file)
    marks = sorted((n for n, f in zip(names, files) if RUN_FILES.fullmatch(f)),  # last.pt, then the models first
                   key=lambda n: (n != 'last.pt', not n.endswith(('.pt', '.safetensors'))))
    if marks:
        last = os.path.join(out, 'last.pt')
        fail(f'{out} already holds a run ({", ".join(marks[:4])}{", ..." * (len(marks) > 4)}): ' +
             (f'continue it with --resume {last}, or ' if 'last.pt' in marks else '') + 'pass another --out-dir')
    ours = False  # a config.json that train.py wrote
    with contextlib.suppress(OSError, ValueError):
        with open(os.path.join(out, 'config.json')) as f:
            ours = {'dataset', 'tasks', 'out_dir'} <= json.load(f).keys()
    others = [n for n, f in zip(names, files) if not (ours and f == 'config.json')]
    if others:
        fail(f'{out} holds files that train.py did not write ({", ".join(others[:3])}): pass a new or empty --out-dir')


def latest_step(out, resume=None, step=None):
    """The last step of the run in a folder: its last.pt's, or its last evaluation's if later; None:
    neither. (resume, step): the checkpoint resumed and its step, not read again if it is last.pt."""
    steps = [r['step'] for r in training_evaluations(read_jsonl(os.path.join(out, 'metrics.jsonl')))]
    last = os.path.join(out, 'last.pt')
    if resume and os.path.isfile(last) and os.path.samefile(resume, last):
        steps.append(step)
    elif os.path.isfile(last):
        steps.append(loaded(lambda p: read_checkpoint(p, mmap=True), last)['step'])
    return max(steps, default=None)


def check_eval_dir(out, checkpoint):
    """--eval-only writes pictures and a metrics.jsonl line: beside its checkpoint, into a new or empty
    folder, or one of earlier --eval-only outputs of the same checkpoint; never into another run's
    folder or a folder of other files."""
    if not os.path.isdir(out) or os.path.samefile(out, os.path.dirname(os.path.abspath(checkpoint))):
        return
    names = sorted(os.listdir(out))
    mine = lambda t: t is not None and os.path.realpath(t) == os.path.realpath(checkpoint)  # noqa: E731
    if all(n in ('metrics.jsonl', 'vis', 'gates.png') or re.fullmatch(r'val_step\d+', n) for n in names) and \
            all(mine(r.get('eval_only')) for r in read_jsonl(os.path.join(out, 'metrics.jsonl'))):
        return
    what = 'other files'
    if any(RUN_FILES.fullmatch(n) for n in names):
        what = 'the files of another run or evaluation'
    fail(f'--out-dir {out} holds {what} ({", ".join(names[:3])}): --eval-only writes its pictures and a metrics.jsonl '
         f'line there; pass a new folder, or no --out-dir to write beside {checkpoint}')


def open_run_folder(run, step, resume=None):
    """Rank 0: config.json, the logs trimmed to `step` (a fresh run starts new ones; --rewind first keeps
    what the run did after it, keep_later; resume: the checkpoint's path), run.best (read from best.pt,
    the one file that holds it, so that it names weights that exist) and run.board."""
    out = run.cfg['out_dir']
    best_pt = os.path.join(out, 'best.pt')
    best = lambda: read_checkpoint(best_pt, mmap=True)['best'] if os.path.isfile(best_pt) else None  # noqa: E731
    try:
        run.best = best()
    except ValueError as e:
        fail(f'{e}; it records the run\'s best evaluation: restore it, or move it aside (e.g. to {best_pt}.damaged) '
             'and resume again: the next evaluation then writes a new best.pt')
    os.makedirs(out, exist_ok=True)
    latest = latest_step(out, resume, step)
    if latest is not None and latest > step:  # (--rewind: check_out_dir refuses it otherwise)
        keep_later(out, step, latest, run.best)
        run.best = best()
    atomic_write(os.path.join(out, 'config.json'), lambda f: f.write(json.dumps(run.cfg, indent=1).encode()))
    trained = truncate_jsonl(os.path.join(out, 'train.jsonl'), step)
    truncate_jsonl(os.path.join(out, 'metrics.jsonl'), step)
    evaluated = logged_scores(out, step, run.model.tasks) is not None
    run.board = open_board(run.cfg, step, evaluated, [r for r in trained if r['step'] == step])


def keep_later(out, step, latest, best):
    """--rewind: what the run in `out` did after `step` (to `latest`), which the resumed run replaces,
    kept in <out>/run_to_step<latest>/: its settings, logs and pictures copied (the logs are trimmed
    next), last.pt and best.* (when its `best` record is later) and later val_step<N>/ moved."""
    keep, k = os.path.join(out, f'run_to_step{latest}'), 1
    while os.path.exists(keep + f'_{k}' * (k > 1)):
        k += 1
    keep += f'_{k}' * (k > 1)
    names = sorted(os.listdir(out))
    copied = [n for n in names if n in ('config.json', 'train.jsonl', 'metrics.jsonl', 'curves.png', 'gates.png',
                                        'vis')]
    later = {'last.pt'} | ({'best.pt', 'best.safetensors'} if best and best['step'] > step else set())
    moved = [n for n in names if n in later or re.fullmatch(r'val_step\d+', n) and int(n[8:]) > step]
    os.makedirs(keep)
    for name in copied:  # (first: a failure leaves every file in place)
        src = os.path.join(out, name)
        (shutil.copytree if os.path.isdir(src) else shutil.copy2)(src, os.path.join(keep, name))
    for name in moved:
        os.replace(os.path.join(out, name), os.path.join(keep, name))
    log(f'note: --rewind: the run to step {latest} is kept in {keep} ({", ".join(moved)} moved; '
        f'{", ".join(copied)} copied)')


def logged_scores(out_dir, step, tasks):
    """The scores of the run's evaluation at `step` if its metrics.jsonl holds them, else None."""
    done = [r for r in training_evaluations(read_jsonl(os.path.join(out_dir, 'metrics.jsonl'))) if r['step'] == step]
    return {t: done[-1][t] for t in tasks} if done else None


def open_board(cfg, step, evaluated, records):
    """Rank 0's TensorBoard writer, into the run folder. Its events from `step` on (from step + 1 when
    the evaluation at `step` is logged: `evaluated`) replace the earlier ones that the viewer reads
    (purge_step: what a killed run wrote after its checkpoint is dropped, as from the JSONL logs); the
    training `records` of `step` that this drops are written again."""
    from torch.utils.tensorboard import SummaryWriter  # (imported here: it takes seconds)
    board = SummaryWriter(cfg['out_dir'], purge_step=step + 1 if evaluated else step)
    for record in [] if evaluated else records:
        add_scalars(board, step, {'train': {k: v for k, v in record.items() if k != 'step'}})
    board.add_text('config', f'```\n{json.dumps(cfg, indent=1)}\n```', step)
    board.flush()
    return board


def add_scalars(board, step, values, prefix=''):
    """Every number of values (nested dicts) as a TensorBoard scalar named by its path, e.g. semseg/mIoU."""
    for k, v in values.items():
        if isinstance(v, dict):
            add_scalars(board, step, v, f'{prefix}{k}/')
        elif isinstance(v, (int, float)) and not isinstance(v, bool):
            board.add_scalar(prefix + k, v, step)


def training_evaluations(records):
    """The records of a run's own evaluations among its metrics.jsonl lines (not those of --eval-only,
    not the input-blind predictors')."""
    return [r for r in records if 'eval_only' not in r and any(t in r for t in TASK_TABLE)]


def append_jsonl(path, record):
    """One record as a line at the end of a JSONL log, on a line of its own after a torn last one."""
    with open(path, 'a+b') as f:
        f.seek(max(0, f.seek(0, os.SEEK_END) - 1))
        torn = f.read(1) not in (b'', b'\n')
        f.write(b'\n' * torn + json.dumps(record).encode() + b'\n')


def read_jsonl(path):
    """The records of a JSONL log ([] if there is none)."""
    return [record for _, record in jsonl_lines(path)]


WARNED = set()  # (path, line number) of each damaged log line already said


def jsonl_lines(path):
    """(line, record) for each line of a run's JSONL log. A line that is not a record, as a last one cut
    short by a kill or a full disk, is skipped with a warning (once per line and process)."""
    if not os.path.isfile(path):
        return
    with open(path) as f:
        for n, line in enumerate(f, 1):
            try:
                record = json.loads(line)
            except ValueError:
                record = None
            if isinstance(record, dict):
                yield line, record
            elif line.strip() and (path, n) not in WARNED:
                WARNED.add((path, n))
                log(f'warning: {path} line {n} is cut short or damaged (a kill or a full disk): skipped')


def truncate_jsonl(path, step):
    """Drop log lines past `step` (written after the checkpoint a run resumes from), and damaged ones
    (jsonl_lines); -> the records kept."""
    if not os.path.isfile(path):
        return []
    keep = [(line.rstrip('\n') + '\n', record) for line, record in jsonl_lines(path) if record.get('step', 0) <= step]
    atomic_write(path, lambda f: f.write(''.join(line for line, _ in keep).encode()))
    return [record for _, record in keep]


# -------------------------------------------------------------------------------------------------
# Evaluation, read in one pass. In training, evaluation_step (last.pt first) -> finish_evaluation:
#   evaluate (Part I: every process, the model on its share of the val split -> data.update_meters ->
#   the meters' scores, all-reduced) -> report (rank 0: printed, metrics.jsonl, TensorBoard, panels,
#   gates.png) -> keep_best (best.safetensors, best.pt) -> curves.png.
# --eval-only: evaluate -> report.
# -------------------------------------------------------------------------------------------------

def shard_loader(val_ds, cfg, world=1, rank=0):
    """This process's share of the val split, in order: contiguous, the shares differ by one image
    at most and none is read twice (a DistributedSampler pads with repeats). Its batches: the training's
    micro-batch, which fits in memory with the activations kept for backward, and at least EVAL_BATCH."""
    n = len(val_ds)
    share = torch.utils.data.Subset(val_ds, range(rank * n // world, (rank + 1) * n // world))
    micro_batch = cfg['batch_size'] // (world * cfg['accum_steps'])
    return data.eval_loader(share, max(EVAL_BATCH, micro_batch), cfg['workers'])


def whole_split(loader):
    """The val dataset a loader reads (its share of, under torchrun: see shard_loader)."""
    ds = loader.dataset
    return ds.dataset if isinstance(ds, torch.utils.data.Subset) else ds


def edge_pool(cfg):
    """The boundary metric's worker processes (--eval-workers), or None to score in this process."""
    n = cfg['eval_workers']
    if n is None:  # this process's share of the CPUs it may run on, less its loaders and itself
        cpus = len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else os.cpu_count()
        n = max(1, cpus // int(os.environ.get('LOCAL_WORLD_SIZE', 1)) - cfg['workers'] - 1)
    return data.EdgePool(n) if n else None


def evaluation_step(run, step, bad):
    """At an evaluation step: last.pt first (a failing evaluation loses no training), then the
    evaluation (finish_evaluation). After non-finite steps the outputs may be non-finite, which the
    meters cannot score: no evaluation then, and last.pt is kept as it is if the weights themselves
    are not finite."""
    rng = [rng_state()]  # every process's RNG state, so that each resumes its own stream
    if run.world > 1:
        rng = [None] * run.world
        dist.all_gather_object(rng, rng_state())
    weights_ok = not bad or all(torch.isfinite(p).all() for p in run.model.parameters())
    if weights_ok and is_main():
        run.save('last.pt', step, rng)
        log(f'saved {run.cfg["out_dir"]}/last.pt')
    if bad:
        log(f'step {step}: the last {bad} step(s) were non-finite: evaluation skipped' +
            ('' if weights_ok else f', {run.cfg["out_dir"]}/last.pt kept (the weights are not finite)'))
    else:
        finish_evaluation(run, step, rng)
    if run.world > 1:
        dist.barrier()


def finish_evaluation(run, step, rng, scores=None):
    """The evaluation of the checkpoint of `step` (its RNG states `rng`): by every process on its share,
    reported, kept as best.* when it improves on run.best; then curves.png and, at the end of a
    synthetic run, the input-blind predictors. scores: the evaluation's, already logged (see
    finish_checkpoint): the model is not evaluated, nor reported, again."""
    cfg, logged = run.cfg, scores is not None
    if not logged:
        save_to = predictions_folder(cfg, step)
        evaluation = evaluate(run.model, run.val_loader, dataset=cfg['dataset'], device=run.device, keep=PANELS,
                              pool=run.pool, save_to=save_to)
        scores = report(cfg, run.model, step, evaluation, board=run.board, save_to=save_to)
    if not is_main():
        return
    keep_best(run, step, scores, rng)
    logs = [read_jsonl(os.path.join(cfg['out_dir'], name)) for name in ('train.jsonl', 'metrics.jsonl')]
    data.write_png(os.path.join(cfg['out_dir'], 'curves.png'), draw_curves(*logs, run.model.tasks))
    if not logged and cfg['dataset'] == 'synthetic' and step == cfg['max_iters']:
        compare_with_trivial(run, step, scores)


def predictions_folder(cfg, step, tag=None):
    """Where --save-predictions writes an evaluation's files (--eval-only's, a run's last), else None."""
    final = tag is not None or step == cfg['max_iters']
    return os.path.join(cfg['out_dir'], f'val_step{step}') if cfg['save_predictions'] and final else None


class Evaluation(NamedTuple):
    """What evaluate returns: every process holds the whole split's scores and gate means."""
    split: torch.utils.data.Dataset  # the val split, a data.py reader (data.READERS)
    scores: dict  # task -> metric -> value
    gates: list  # [tap] task -> mean gate weight of each candidate (the E experts, then the memory)
    kept: list  # this process's first `keep` samples: (image, targets, predictions, id), cropped, on the CPU
    seconds: float


class GateMeans:
    """The gate weights of an evaluation summed per tap, task and candidate over the tokens of the
    images' content (not the padding); means() divides by the tokens."""

    def __init__(self, model, device):
        self.device = device
        self.sums = [{t: torch.zeros(g.out_features, device=device) for t, g in m.gates.items()} for m in model.mmoe]
        self.tokens = torch.zeros((), dtype=torch.float64)

    def add(self, taps, metas, size):
        """taps: the gate weights of a forward pass (TaskExpert.forward_with_gates); metas: the batch's; size: its (H, W)."""
        valid = torch.zeros(len(metas), size[0] // PATCH, size[1] // PATCH)
        for i, meta in enumerate(metas):
            valid[i, :math.ceil(meta['size'][0] / PATCH), :math.ceil(meta['size'][1] / PATCH)] = 1
        self.tokens += valid.sum().item()
        valid = valid.flatten(1)[..., None].to(self.device, non_blocking=True)  # (B, N, 1)
        for sums, tap in zip(self.sums, taps):
            for t, g in tap.items():
                sums[t] += (g.float() * valid).sum((0, 1))

    def state(self):
        return [v for tap in self.sums for v in tap.values()] + [self.tokens]

    def means(self):
        return [{t: (v / self.tokens.item()).tolist() for t, v in tap.items()} for tap in self.sums]


def log_progress(done, batch, share, total, t0):
    """'eval: 262/654 images, 31.2 img/s, eta 0:00:13' on rank 0 at every tenth of its share (of
    `share` images, `done` of them read), which stands for the whole split of `total`."""
    if is_main() and done * 10 // share > (done - batch) * 10 // share:
        part, elapsed = done / share, time.time() - t0
        log(f'  eval: {round(part * total)}/{total} images, {part * total / elapsed:.1f} img/s, '
            f'eta {datetime.timedelta(seconds=round(elapsed * (1 - part) / part))}')


def report(cfg, model, step, evaluation, *, board=None, tag=None, save_to=None):
    """Rank 0: an evaluation's scores printed with Delta_m over --baselines and its images, seconds and
    images/s; drawn (draw_evaluation); written to TensorBoard and, last, appended to metrics.jsonl (a
    run's last evaluation marked 'report': the numbers to report, docs/evaluation.md, 'Which numbers
    to report'; --eval-only's tagged with its checkpoint, `tag`). -> the scores, on every process."""
    scores, split = evaluation.scores, evaluation.split
    if not is_main():
        return scores
    # mean gate weight per tap, task and candidate (experts 1..E, then the memory slot at every tap but
    # the first); the memory slot alone tells how much each task reads the memory. Static: no gates.
    by_tap = {f'block{b}': {t: [round(w, 4) for w in g] for t, g in tap.items()}
              for b, tap in zip(model.taps, evaluation.gates) if tap}
    memory = {b: {t: g[-1] for t, g in tap.items()} for b, tap in list(by_tap.items())[1:]}
    subsets = {t: what for t, what in split.subsets.items() if t in scores}  # the tasks scored on some images
    final = tag is None and step == cfg['max_iters']
    record = {'step': step, **({'eval_only': tag} if tag else {}), **({'report': True} if final else {}),
              'precision': 'fp32', **scores, **({'scored_on': subsets} if subsets else {}), 'gate_memory': memory,
              'gates': by_tap}
    baselines = read_baselines(cfg)
    if baselines:
        record['delta_m'] = data.delta_m({t: scores[t][TASK_TABLE[t].metric] for t in scores}, baselines)
        record['baselines'] = baselines
    log(f'eval at step {step} ({len(split)} val images, {evaluation.seconds:.1f} s, '
        f'{len(split) / evaluation.seconds:.1f} img/s' + ''.join(f'; {t} on {w}' for t, w in subsets.items()) + '):')
    log_scores(record, scores, per_class=tag is not None)
    if save_to:
        log(f'  the predictions of the {len(split)} val images: {save_to}/<task>/<id>.png (depth .mat)')
    draw_evaluation(cfg, model, step, evaluation, board)
    if board:
        numbers = {t: {k: v for k, v in s.items() if k != 'class_IoU'} for t, s in scores.items()}
        per_class = {f'{t}_class_IoU': s['class_IoU'] for t, s in scores.items() if 'class_IoU' in s}
        add_scalars(board, step, {**numbers, **per_class, 'memory_gate': memory, 'delta_m': record.get('delta_m')})
        board.flush()
    append_jsonl(os.path.join(cfg['out_dir'], 'metrics.jsonl'), record)  # last: its line means all is written
    return scores


def draw_evaluation(cfg, model, step, evaluation, board=None):
    """An evaluation's pictures: vis/<id>.png, the panels of its first images (input, then ground truth
    above prediction per task), and gates.png; also into TensorBoard."""
    vis = os.path.join(cfg['out_dir'], 'vis')
    os.makedirs(vis, exist_ok=True)
    for image, targets, preds, id_ in evaluation.kept:
        maps = {t: m[0] for t, m in postprocess({t: p[None] for t, p in preds.items()}).items()}
        panel = draw_panel(denormalise(image).permute(1, 2, 0).to(torch.uint8).numpy(), maps, targets)
        data.write_png(os.path.join(vis, f'{id_}.png'), panel)
        if board:
            board.add_image(f'panels/{id_}', np.asarray(panel), step, dataformats='HWC')
    if any(evaluation.gates):  # (--ablation static has no gates)
        picture = draw_gates(evaluation.gates, model.taps)
        data.write_png(os.path.join(cfg['out_dir'], 'gates.png'), picture)
        if board:
            board.add_image('gates', np.asarray(picture), step, dataformats='HWC')


def log_scores(record, results, per_class):
    """An evaluation's lines: every task's metrics, with per_class (--eval-only) each class's IoU in a
    table as the reference meters print them, the memory's gate weight, Delta_m over --baselines."""
    for t, scores in results.items():
        log(f'  {t:12s} ' + '  '.join(f'{k} {v:.4g}' for k, v in scores.items() if k != 'class_IoU') +
            f'   [main: {TASK_TABLE[t].metric}, {"higher" if TASK_TABLE[t].higher else "lower"} is better]')
    for t, scores in results.items() if per_class else ():
        if 'class_IoU' in scores:
            log(class_table(t, scores['class_IoU']))
    if record['gate_memory']:
        log('  memory gate weight per tap (mean over tasks): ' + '  '.join(
            f'{b} {sum(v.values()) / len(v):.3f}' for b, v in record['gate_memory'].items()))
    if 'delta_m' in record:
        log(f'  Delta_m {record["delta_m"]:+.2f} % over the --baselines (' +
            ', '.join(f'{t} {TASK_TABLE[t].metric} {v:.4g}' for t, v in record['baselines'].items()) + ')')


def class_table(task, iou):
    """dict class name -> IoU (%) -> a table of the classes in id order, five to a line."""
    width = max(map(len, iou))
    cells = [f'{name:>{width}s} {v:5.1f}' for name, v in iou.items()]
    return '\n'.join([f'  {task} IoU per class (%):'] + ['    ' + '  '.join(cells[i:i + 5])
                                                          for i in range(0, len(cells), 5)])


def read_baselines(cfg):
    """--baselines -> task -> its main metric at the last evaluation of the run that trained it (the
    number a run reports), for every task of this run; None without --baselines. Stops with one line
    naming the folder when it is not a run of this dataset with an evaluation, or when a task is in
    two of the runs or in none."""
    if not cfg['baselines']:
        return None
    found = {}  # task -> (main metric, folder)
    for folder in cfg['baselines']:
        files = [os.path.join(folder, name) for name in ('config.json', 'metrics.jsonl')]
        if not all(map(os.path.isfile, files)):
            fail(f'--baselines {folder}: not a folder of train.py\'s (no config.json and metrics.jsonl there)')
        with open(files[0]) as f:
            dataset = json.load(f)['dataset']
        evals = training_evaluations(read_jsonl(files[1]))
        if not evals:
            fail(f'--baselines {folder}: its metrics.jsonl holds no evaluation yet')
        if dataset != cfg['dataset']:
            fail(f'--baselines {folder}: a run on {dataset}; this one is on {cfg["dataset"]}')
        for t in TASK_TABLE.keys() & evals[-1].keys():
            if t in found:
                fail(f'--baselines: {t} is in both {found[t][1]} and {folder}; pass one run per task')
            found[t] = evals[-1][t][TASK_TABLE[t].metric], folder
            if found[t][0] == 0:  # Delta_m's gains are relative to it
                fail(f'--baselines {folder}: its {t} {TASK_TABLE[t].metric} is 0, no baseline for a relative gain')
    missing = [t for t in cfg['tasks'] if t not in found]
    if missing:
        fail(f'--baselines: no run for {", ".join(missing)}; pass one for each task of this run '
             f'(e.g. one of --tasks {missing[0]})')
    return {t: found[t][0] for t in cfg['tasks']}



def keep_best(run, step, scores, rng):
    """Rank 0: when the main metric of the run's first task (e.g. semseg mIoU; depth RMSE for a --tasks
    depth run) improves on run.best, the model of `step` becomes best.safetensors, then best.pt with
    the best record. Only best.pt holds the record (last.pt is written before its evaluation) and it is
    written last, so the record always names weights that exist. The val split is the test split of
    NYUD-v2 and PASCAL-Context: best.* is a convenience chosen on test, and the last evaluation is the
    one to report, as the metadata says."""
    out, task = run.cfg['out_dir'], next(iter(run.model.tasks))
    key, higher = TASK_TABLE[task].metric, TASK_TABLE[task].higher
    metric, value, best = f'{task} {key}', scores[task][key], run.best
    if best is None or (value > best['value'] if higher else value < best['value']):
        run.best = {'metric': metric, 'value': value, 'step': step}
        selection = (f'the {"highest" if higher else "lowest"} {metric} of the run\'s evaluations on the val '
                     'split, which is the test split of NYUD-v2 and PASCAL-Context: a convenience, not a number '
                     'to report; report the last evaluation (its line in metrics.jsonl says "report": true)')
        save_weights(os.path.join(out, 'best.safetensors'), run.model, step, run.cfg, scores, selection)
        run.save('best.pt', step, rng, best=run.best)
        log(f'saved {out}/best.safetensors and best.pt ({metric} {value:.4g}; chosen on val = test: report the '
            'last evaluation)')
    else:
        log(f'best.pt: {metric} {best["value"]:.4g} at step {best["step"]}')


def compare_with_trivial(run, step, scores):
    """End of a synthetic run: the main metrics next to the input-blind predictors' (metrics.jsonl,
    TensorBoard), on the whole val split."""
    cfg = run.cfg
    loader = data.eval_loader(whole_split(run.val_loader), cfg['batch_size'], cfg['workers'])
    trivial = data.trivial_scores(loader, run.model.tasks, cfg['dataset'])
    add_scalars(run.board, step, {'input_blind': trivial})
    run.board.flush()
    append_jsonl(os.path.join(cfg['out_dir'], 'metrics.jsonl'), {'step': step, 'trivial': trivial})
    log('model vs. input-blind predictors on the val split (majority class / mean depth / mean normal / all-edge):')
    for t, task_scores in scores.items():
        key, higher = TASK_TABLE[t].metric, TASK_TABLE[t].higher
        m, b = task_scores[key], trivial[t][key]
        log(f'  {t:12s} {key} {m:8.4g} vs {b:8.4g}  ({m / b:.2f}x, {"higher" if higher else "lower"} is better)')


# -------------------------------------------------------------------------------------------------
# Pictures with PIL and numpy only
# -------------------------------------------------------------------------------------------------

def _palette():
    """The PASCAL VOC colour map: class k's bits spread over the high bits of R, G, B."""
    pal = np.zeros((256, 3), np.uint8)
    for k in range(256):
        c = k
        for shift in range(7, -1, -1):
            pal[k] |= np.array([(c >> 0) & 1, (c >> 1) & 1, (c >> 2) & 1], np.uint8) << shift
            c >>= 3
    return pal


PALETTE = _palette()  # its entry 255 (void / padding) is a light cream, unlike any class
VIRIDIS = np.array([(68, 1, 84), (59, 82, 139), (33, 145, 140), (94, 201, 98), (253, 231, 37)], np.float64)


def colour_map(x, lo, hi):
    """(h, w) floats -> (h, w, 3) uint8 along viridis anchors, lo dark ... hi bright."""
    t = np.clip((x - lo) / max(hi - lo, 1e-6), 0, 1) * (len(VIRIDIS) - 1)
    i = np.minimum(t.astype(int), len(VIRIDIS) - 2)
    f = (t - i)[..., None]
    return (VIRIDIS[i] * (1 - f) + VIRIDIS[i + 1] * f).astype(np.uint8)


def render(task, x, depth_range=None):
    """One task map, ground truth or post-processed prediction (class ids (h, w) or (1, h, w); metres or
    probabilities (1, h, w); unit normals (3, h, w); a tensor or an array) -> RGB uint8 (h, w, 3)."""
    x, kind = torch.as_tensor(x), TASK_TABLE[task].kind
    if kind == 'classes':
        return PALETTE[x.reshape(x.shape[-2:]).long().clamp(0, 255).numpy()]
    x = x.float()
    if kind == 'depth':
        img = colour_map(x[0].numpy(), *depth_range)
        img[x[0].numpy() <= 0] = 0  # invalid depth in black
        return img
    if kind == 'normals':
        img = ((x.permute(1, 2, 0).numpy().clip(-1, 1) + 1) * 127.5).astype(np.uint8)
        img[(x.abs().sum(0) == 0).numpy()] = 0  # invalid normals in black
        return img
    if kind == 'binary':  # grey
        return np.repeat((x[0].clamp(0, 1).numpy() * 255).astype(np.uint8)[..., None], 3, -1)
    raise unknown_kind(task, 'picture')


def draw_panel(rgb, preds, targets=None):
    """The input (h, w, 3) uint8, then one column per task: ground truth above the prediction (or
    predictions only), each map (see render) shown at the input's size."""
    h, w = rgb.shape[:2]
    label_h = 14
    tasks = list(preds)
    rows = 1 if targets is None else 2
    canvas = Image.new('RGB', ((1 + len(tasks)) * w, rows * (h + label_h)), 'white')
    draw = ImageDraw.Draw(canvas)
    canvas.paste(Image.fromarray(rgb), (0, label_h))
    draw.text((2, 1), 'input', fill='black')
    if targets is not None:
        draw.text((2, h + label_h + 1), 'top: ground truth', fill='black')
        draw.text((2, h + label_h + 13), 'bottom: prediction', fill='black')
    for c, t in enumerate(tasks, 1):
        depth_range = None
        if TASK_TABLE[t].kind == 'depth':  # one scale for ground truth and prediction
            ref = torch.as_tensor(targets[t] if targets is not None else preds[t])
            ref = ref[ref > 0]
            depth_range = (ref.min().item(), ref.max().item()) if ref.numel() else (0.0, 10.0)
        cells = [render(t, m[t], depth_range) for m in ((targets, preds) if targets is not None else (preds,))]
        for r, cell in enumerate(cells):
            canvas.paste(Image.fromarray(cell).resize((w, h), Image.NEAREST), (c * w, r * (h + label_h) + label_h))
            draw.text((c * w + 2, r * (h + label_h) + 1), t if r == 0 else f'{t} (prediction)', fill='black')
    return canvas


def draw_curves(train_log, evals, tasks, w=250, h=150):
    """One column per task: its training loss over the steps (train.jsonl records, unweighted) above its
    main val metric over the run's evaluations (metrics.jsonl records), with the ranges written in."""
    canvas = Image.new('RGB', (len(tasks) * w, 2 * h), 'white')
    draw = ImageDraw.Draw(canvas)
    colour = tuple(VIRIDIS[1].astype(int))
    for c, t in enumerate(tasks):
        key, higher = TASK_TABLE[t].metric, TASK_TABLE[t].higher
        for r, (title, points) in enumerate([
                (f'{t} loss (train)', [(e['step'], e[t]) for e in train_log if t in e]),
                (f'{t} {key} (val, {"higher" if higher else "lower"} is better)',
                 [(e['step'], e[t][key]) for e in evals if t in e and 'eval_only' not in e])]):
            x0, y0, x1, y1 = c * w + 46, r * h + 18, (c + 1) * w - 12, (r + 1) * h - 18  # the plot area
            draw.text((c * w + 4, r * h + 3), title, fill='black')
            draw.rectangle((x0, y0, x1, y1), outline=(190, 190, 190))
            points = [(s, v) for s, v in points if math.isfinite(v)]
            if not points:
                continue
            (s0, s1), (v0, v1) = ((min(a), max(a)) for a in zip(*points))
            xy = [(x0 + (x1 - x0) * (s - s0) / max(s1 - s0, 1), y1 - (y1 - y0) * (v - v0) / max(v1 - v0, 1e-12))
                  for s, v in points]
            draw.line(xy, fill=colour, width=2)
            for x, y in xy if r else []:  # a dot per evaluation
                draw.ellipse((x - 3, y - 3, x + 3, y + 3), fill=colour)
            draw.text((c * w + 4, y0 - 4), f'{v1:.3g}', fill='black')
            draw.text((c * w + 4, y1 - 8), f'{v0:.3g}', fill='black')
            draw.text((x0, y1 + 3), f'step {s0}', fill='black')
            draw.text((x1 - 6 * len(str(s1)), y1 + 3), str(s1), fill='black')
    return canvas


def draw_gates(gates, taps, cell=28):
    """Mean gate weight per task (block of the grid), tap (row) and candidate (column: experts, then
    M = the memory slot, absent at the first tap) as a heatmap with the values written in, and a
    two-line key below."""
    tasks = list(gates[0])
    n_experts = len(gates[0][tasks[0]])  # the first tap weighs the experts only
    n_cols = max(len(g[tasks[0]]) for g in gates)
    left, top, gap, key_h = 56, 30, 16, 30
    block_w = n_cols * cell
    height = top + len(gates) * cell + 4
    canvas = Image.new('RGB', (left + len(tasks) * (block_w + gap), height + key_h), 'white')
    draw = ImageDraw.Draw(canvas)
    for r, b in enumerate(taps):
        draw.text((4, top + r * cell + 8), f'block {b}', fill='black')
    for k, t in enumerate(tasks):
        x0 = left + k * (block_w + gap)
        draw.text((x0, 2), t, fill='black')
        for c in range(n_cols):
            draw.text((x0 + c * cell + 8, 16), 'M' if c >= n_experts else str(c + 1), fill='black')
        for r, tap in enumerate(gates):
            for c, v in enumerate(tap[t]):  # the first tap has no memory column
                shade = int(255 * (1 - min(1.0, v * 2)))  # 0.5 or more = darkest
                box = (x0 + c * cell, top + r * cell, x0 + (c + 1) * cell - 2, top + (r + 1) * cell - 2)
                draw.rectangle(box, fill=(shade, shade, 255))
                draw.text((box[0] + 2, box[1] + 8), f'{v:.2f}'[1:] if v < 1 else '1.0',
                          fill='black' if shade > 120 else 'white')
    draw.text((4, height), 'mean gate weight over the val tokens: each row sums to 1 (darker = more)', fill='black')
    draw.text((4, height + 13), f'columns 1-{n_experts}: the experts, shared by the tasks' +
              ('; M: the task\'s memory (still empty at the first tap)' if n_cols > n_experts else ''), fill='black')
    return canvas


# -------------------------------------------------------------------------------------------------
# Predictions on a user's images
# -------------------------------------------------------------------------------------------------

IMAGE_EXTS = ('.png', '.jpg', '.jpeg', '.bmp', '.tif', '.tiff', '.webp')


def predict_images(model, source, out_dir, device, amp_dtype):
    """--predict: per image, named by its file name with its extension (a.jpg and a.png apart), <name>.npz,
    its predictions at its size as shown (taskexpert.predict: EXIF orientation applied; class ids as
    uint8), and <name>.png, a panel of the input and every task, shrunk to the network size if larger;
    each written atomically. The inputs are never touched: an output folder that holds them is refused.
    Of a folder, the files that are not images (by extension) are counted, and one that cannot be read
    is said in a line and skipped: the others are predicted, then the command fails naming how many."""
    names = [] if os.path.isfile(source) else sorted(os.listdir(source))
    files = [source] if os.path.isfile(source) else [os.path.join(source, n) for n in names
                                                    if n.lower().endswith(IMAGE_EXTS)]
    if not files:
        fail(f'--predict {source}: no images ({", ".join(IMAGE_EXTS)}) there')
    if os.path.isdir(out_dir) and any(os.path.samefile(out_dir, os.path.dirname(os.path.abspath(f))) for f in files):
        fail(f'--out-dir {out_dir} holds the images of --predict {source}: pass another folder for the predictions')
    if others := [n for n in names if not n.lower().endswith(IMAGE_EXTS)]:
        log(f'note: {source}: {len(others)} of its {len(names)} entries are not images by their extension, skipped '
            f'(e.g. {others[0]}); images are {", ".join(IMAGE_EXTS)}')
    writable(out_dir)
    unread = []
    for path in files:
        try:
            with Image.open(path) as im:
                im = rgb_image(im)  # upright, 8-bit RGB, or refused
        except (OSError, ValueError, Image.DecompressionBombError) as e:  # (PIL refuses images over 179 megapixels)
            if len(files) == 1:
                fail(f'{path}: cannot read the image ({e})')
            log(f'{path}: cannot read the image ({e}): skipped')
            unread.append(path)
            continue
        with autocast(device, amp_dtype):
            maps = predict(model, im)
        maps = {k: v.astype(np.uint8) if k in model.tasks and TASK_TABLE[k].kind == 'classes' else v
                for k, v in maps.items()}  # (at most 40 classes)
        stem = os.path.join(out_dir, os.path.basename(path))
        atomic_write(stem + '.npz', lambda f: np.savez_compressed(f, **maps))
        size = im.size
        im.thumbnail((model.backbone.grid[1] * PATCH, model.backbone.grid[0] * PATCH))  # a photo's panel would be huge
        rows, cols = (np.arange(n) * full // n for n, full in zip(im.size[::-1], size[::-1]))  # nearest, to draw
        panel = draw_panel(np.asarray(im), {k: v[..., rows[:, None], cols] for k, v in maps.items()})
        data.write_png(stem + '.png', panel)
        log(f'{path} -> {stem}.png, .npz')
    if unread:
        fail(f'{len(unread)} of the {len(files)} images of {source} could not be read (each said above); the others\' '
             f'predictions are in {out_dir}')


# -------------------------------------------------------------------------------------------------
# Benchmark: FLOPs, speed, MFU, memory of the training step and of inference (--benchmark)
# -------------------------------------------------------------------------------------------------

def random_batch(tasks, batch_size, size, device):
    """Random inputs and targets in the contract's formats (for --benchmark: no data needed)."""
    B, (H, W) = batch_size, size
    batch = {'image': torch.randn(B, 3, H, W, device=device)}
    for t, c in tasks.items():
        kind = TASK_TABLE[t].kind
        if kind == 'classes':
            batch[t] = torch.randint(0, c, (B, H, W), device=device)
        elif kind == 'depth':
            batch[t] = torch.rand(B, 1, H, W, device=device) * 5 + 0.5
        elif kind == 'normals':
            batch[t] = F.normalize(torch.randn(B, 3, H, W, device=device), dim=1)
        elif kind == 'binary':
            batch[t] = (torch.rand(B, 1, H, W, device=device) < 0.1).float()
        else:
            raise unknown_kind(t, 'random target')
    return batch


# Dense (no sparsity) bf16 tensor-core peaks in TFLOP/s from the vendors' datasheets, for the MFU;
# the first name found as a word in torch.cuda.get_device_name() wins. V100 and T4 have no bf16:
# their fp16 peak.
PEAK_TFLOPS = [('H200 NVL', 835), ('H200', 989), ('H100 NVL', 835), ('H100 PCIe', 756), ('H100', 989),
               ('A100', 312), ('L40S', 362), ('L4', 121), ('A10', 125), ('RTX 4090', 165), ('RTX 3090', 71),
               ('RTX A6000', 155), ('V100', 125), ('T4', 65)]


def peak_tflops(device):
    """-> (peak TFLOP/s, device name) or (None, name) for a device not in PEAK_TFLOPS."""
    if device.type != 'cuda':
        return None, 'CPU'
    name = torch.cuda.get_device_name(device)
    return next((p for key, p in PEAK_TFLOPS if re.search(rf'\b{key}\b', name)), None), name


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


def median_seconds(fn, device, warmup, runs):
    """fn() timed `warmup + runs` times (CUDA synchronised) -> (median seconds after the warm-up,
    seconds of the first call)."""
    times = []
    for _ in range(warmup + runs):
        if device.type == 'cuda':
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        fn()
        if device.type == 'cuda':
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times[warmup:]), times[0]


def gemm_tflops(device, n=8192):
    """The TFLOP/s of a bf16 matmul (n x n by n x n) on this GPU: what its tensor cores reach in practice,
    below the datasheet's peak, for a second MFU."""
    a, b = (torch.randn(n, n, device=device, dtype=torch.bfloat16) for _ in range(2))
    seconds, _ = median_seconds(lambda: a @ b, device, warmup=3, runs=10)
    return 2 * n ** 3 / seconds / 1e12


def benchmark(cfg, device, amp_dtype, why, peak=None, flops_only=False, warmup=3, runs=10):
    """Counted FLOPs per image, then the median time of training steps (train_step, as in training)
    and of inference on random inputs at the configured backbone, size, batch and variant (--amp,
    --compile, --grad-checkpoint, --accum-steps): img/s, achieved TFLOP/s, MFU, peak memory. The
    backbone's share of inference is forward_features alone against the whole forward."""
    with torch.device('meta'):  # shapes only: no memory, no arithmetic, any backbone on any machine
        forward, flops = count_train_flops(TaskExpert.from_config({**cfg, 'grad_checkpoint': 'off'}))
    B, (H, W) = cfg['batch_size'], cfg['img_size']
    print(f'benchmark: {cfg["backbone"]} backbone, {H}x{W}, batch {B} in {cfg["accum_steps"]} micro-batch(es), '
          f'E={cfg["num_experts"]} D={cfg["expert_dim"]}, --ablation {cfg["ablation"]}, {device}, {why}, '
          f'--grad-checkpoint {cfg["grad_checkpoint"]}, compile {"on" if cfg["compile"] else "off"}')
    print(f'counted per image (torch.utils.flop_counter): forward {forward / 1e12:.4g} TFLOP, forward + backward '
          f'{flops / 1e12:.4g} TFLOP (matmuls, convolutions, attention; recomputation not counted)', flush=True)
    if flops_only:
        return
    run = build(cfg, device=device, world=1, rank=0, amp_dtype=amp_dtype, use_scaler=amp_dtype == torch.float16)
    model, batch = run.model, random_batch(run.model.tasks, B, cfg['img_size'], device)

    def inference(backbone_only=False):
        with torch.no_grad(), autocast(device, amp_dtype):
            if backbone_only:
                model.backbone.forward_features(batch['image'], model.taps)
            else:
                model(batch['image'])

    if device.type == 'cuda':
        torch.cuda.reset_peak_memory_stats(device)
    model.train()
    t_train, t_first = median_seconds(lambda: train_step(run, batch), device, warmup, runs)
    if device.type == 'cuda':
        peak_mem = (f'allocated {torch.cuda.max_memory_allocated(device) / 2 ** 30:.2f} GiB, reserved '
                    f'{torch.cuda.max_memory_reserved(device) / 2 ** 30:.2f} GiB (torch.cuda.max_memory_*)')
    else:  # Linux reports ru_maxrss in KiB
        peak_mem = f'{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20:.2f} GiB (peak RSS of the process)'
    model.eval()
    t_infer, _ = median_seconds(inference, device, warmup, runs)
    t_backbone, _ = median_seconds(lambda: inference(backbone_only=True), device, warmup, runs)
    achieved = flops * B / t_train / 1e12
    known, name = peak_tflops(device)
    peak = peak or known
    gemm = gemm_tflops(device) if device.type == 'cuda' else None
    print(f'train:     {B / t_train:8.2f} img/s  ({t_train * 1000:.1f} ms per step, median of {runs} after {warmup} '
          f'warm-up; the first took {t_first:.1f} s)')
    print(f'           {achieved:.3g} TFLOP/s achieved, MFU ' +
          (f'{100 * achieved / peak:.1f} % of {peak:g} TFLOP/s ({name}, dense bf16 peak)' if peak else
           f'unknown: no peak for {name} (pass --peak-tflops)') +
          (f'; {100 * achieved / gemm:.1f} % of the {gemm:.0f} TFLOP/s of a bf16 matmul measured here' if gemm else ''))
    print(f'inference: {B / t_infer:8.2f} img/s  ({t_infer * 1000:.1f} ms per batch, eager)')
    share = min(1.0, t_backbone / t_infer)
    print(f'inference time: backbone {100 * share:.0f}%, MMoE + heads {100 * (1 - share):.0f}%')
    print(f'peak memory in training: {peak_mem}')


# -------------------------------------------------------------------------------------------------
# Command line
# -------------------------------------------------------------------------------------------------

HELD_LOCKS = {}  # (device, inode) of each train.lock this process holds -> its owner line


@contextlib.contextmanager
def hold_out_dir(out_dir):
    """Hold <out_dir>/train.lock, a file naming the owner's pid and host, with an exclusive POSIX record
    lock (lockf) for the run's lifetime: a second run or a --resume on the folder is refused meanwhile.
    The system drops the lock when its process ends, however it ends, and a forked child (a data loader
    worker) does not inherit it: the lock of a killed run is free at once, its file taken over. Such a
    lock is the process's: a second one here would be granted, and closing any file of the lock's
    releases it, so the locks held here are known (HELD_LOCKS) and their files never opened twice."""
    import fcntl  # POSIX (Linux, macOS)
    created = []  # the folders this run makes, deepest first (runs/nyud: runs/nyud, then runs)
    folder = os.path.abspath(out_dir)
    while not os.path.isdir(folder):
        created.append(folder)
        folder = os.path.dirname(folder)
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, 'train.lock')
    busy = lambda owner: fail(f'{out_dir} is in use by another run ({owner}; {path}): '  # noqa: E731
                              'wait for it to end, or pass another --out-dir')
    while True:
        with contextlib.suppress(FileNotFoundError):
            if (held := HELD_LOCKS.get(inode(os.stat(path)))) is not None:
                busy(held)
        f = open(path, 'a+')
        try:
            fcntl.lockf(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except (BlockingIOError, PermissionError):  # (EAGAIN or EACCES: held)
            f.seek(0)
            owner = f.read().strip() or 'just starting'
            f.close()
            busy(owner)
        with contextlib.suppress(FileNotFoundError):  # (else its last holder removed it as we opened it)
            if os.path.samestat(os.fstat(f.fileno()), os.stat(path)):
                break
        f.close()
    f.seek(0)
    if stale := f.read().strip():
        log(f'note: {path} was left by a run that did not end cleanly ({stale}): stale, taken over')
    f.truncate(0)
    owner = f'pid {os.getpid()} on {socket.gethostname()}'
    f.write(owner + '\n')
    f.flush()
    key = inode(os.fstat(f.fileno()))
    HELD_LOCKS[key] = owner
    try:
        yield
    finally:
        del HELD_LOCKS[key]
        os.remove(path)  # before unlocking: a process that opened it meanwhile finds it gone and retries
        f.close()
        with contextlib.suppress(OSError):  # only if empty: a run refused for bad input leaves nothing
            for folder in created:
                os.rmdir(folder)


def inode(stat):
    return stat.st_dev, stat.st_ino


@contextlib.contextmanager
def one_line_errors(out_dir):
    """A full disk, an unwritable --out-dir, or a data file damaged after the start-up check: one line,
    not a traceback, with the remedy that fits. What was saved stays intact (atomic checkpoints; logs
    trimmed on --resume)."""
    try:
        yield
    except DataError as e:  # raised in a loader worker, it is a traceback whose last line is ours
        fail(str(e).strip().splitlines()[-1].removeprefix(f'{DataError.__module__}.DataError: '))
    except OSError as e:
        where = str(e.filename or out_dir)
        ours = os.path.abspath(where).startswith(os.path.abspath(out_dir))
        full = e.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EIO)  # (EIO: atomic_write's torch.save)
        locked = e.errno in (errno.EACCES, errno.EPERM, errno.EROFS)
        remedy = ('free some space or ' if full else 'the folder is not writable: ' if locked else '') + \
            'pass another --out-dir'
        fail(f'{where}: {e.strerror or e}' + f'; {remedy}' * ours)


def writable(folder):
    """Make `folder` if missing and ask the file system for a file there (unnamed, gone when closed): a
    folder that cannot be written fails now, naming it (one_line_errors), before the work."""
    os.makedirs(folder, exist_ok=True)
    try:
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as e:
        raise OSError(e.errno, e.strerror, folder) from None


def find_checkpoint(args, out_dir):
    if args.checkpoint:
        return args.checkpoint
    for name in ('best.pt', 'last.pt'):
        if os.path.isfile(os.path.join(out_dir, name)):
            return os.path.join(out_dir, name)
    what = '--eval-only' if args.eval_only else '--predict'
    fail(f'{what} needs a checkpoint: pass --checkpoint PATH (none in {out_dir})')


def check_modes(args):
    """One mode at a time (training, --eval-only, --predict, --benchmark), each with the flags it reads."""
    modes = [m for m in ('eval_only', 'predict', 'benchmark') if getattr(args, m) not in (None, False)]
    if len(modes) > 1:
        fail(f'--{modes[0].replace("_", "-")} and --{modes[1].replace("_", "-")} cannot be combined')
    if modes and args.resume is not None:
        fail(f'--resume continues training; --{modes[0].replace("_", "-")} reads --checkpoint PATH')
    if args.rewind and args.resume is None:
        fail('--rewind applies to --resume only')
    if args.checkpoint and not (args.eval_only or args.predict):
        fail('--checkpoint is read by --eval-only and --predict; to continue training use --resume PATH')
    if (args.flops_only or args.peak_tflops) and not args.benchmark:
        fail(f'--{"flops-only" if args.flops_only else "peak-tflops"} applies to --benchmark only')
    given = given_settings(args)
    if (given.get('save_predictions') or given.get('baselines')) and (args.predict or args.benchmark):
        fail(f'--{"save-predictions" if given.get("save_predictions") else "baselines"} applies to training and '
             '--eval-only')


def open_checkpoint(args):
    """The checkpoint the mode reads -> (its path, its full training state to resume from, the trained
    model of --eval-only / --predict, the output folder); None where the mode has none."""
    default_out = os.path.join('runs', given_settings(args).get('dataset', 'synthetic'))
    if args.resume is not None:
        path = args.resume or os.path.join(args.out_dir or default_out, 'last.pt')
        if not os.path.exists(path):
            fail(f'--resume: no checkpoint at {path}: pass --resume RUN/last.pt, the last.pt of the run to continue')
        ckpt = loaded(read_checkpoint, path)
        if 'optimizer' not in ckpt:
            fail(f'--resume {path}: holds the weights alone; resuming needs the full state of a last.pt')
        return path, ckpt, None, args.out_dir or os.path.dirname(path) or '.'
    if args.eval_only or args.predict:
        path = find_checkpoint(args, args.out_dir or default_out)
        return path, None, loaded(TaskExpert.from_checkpoint, path), args.out_dir or (os.path.dirname(path) or '.')
    return None, None, None, args.out_dir or default_out


def main(argv=None):
    for signum in (signal.SIGTERM, signal.SIGHUP):  # `kill`, a job scheduler's stop, a closed terminal: as Ctrl-C
        signal.signal(signum, interrupt)
    args = parse_args(argv)
    check_modes(args)
    if args.benchmark:
        cfg = resolve_config(args)
        check_config(cfg, name=setting_name(args))
        device = pick_device(cfg['device'])
        amp_dtype, _, why = pick_precision(cfg['amp'], device)
        benchmark(cfg, device, amp_dtype, why, args.peak_tflops, args.flops_only)
        return
    path, ckpt, model, out_dir = open_checkpoint(args)
    cfg = resolve_config(args, ckpt['config'] if ckpt else model.config if model else None)
    cfg['out_dir'] = out_dir
    check_config(cfg, training=not (args.eval_only or args.predict), name=setting_name(args))
    try:
        run_mode(args, cfg, path, ckpt, model)
    except KeyboardInterrupt:
        fail(f'interrupted; {what_was_saved(args, cfg)}')


def interrupt(signum, frame):
    raise KeyboardInterrupt


def what_was_saved(args, cfg):
    """After Ctrl-C, SIGTERM or SIGHUP: what the interrupted command leaves, in a few words."""
    out = cfg['out_dir']
    if args.predict:
        return f'the predictions written so far are in {args.out_dir or os.path.join(out, "predictions")}'
    if args.eval_only:
        return 'the evaluation was not finished: nothing logged'
    last = os.path.join(out, 'last.pt')
    with contextlib.suppress(OSError, ValueError):
        return f'{last} holds step {read_checkpoint(last, mmap=True)["step"]}: continue with --resume {last}'
    return 'no checkpoint was saved yet: nothing to resume'


def run_mode(args, cfg, path, ckpt, model):
    """--predict, --eval-only or training, with their processes: torchrun's, the boundary workers. Each
    writes into a folder, never one that is another run's or a user's (check_out_dir, check_eval_dir)."""
    out_dir = cfg['out_dir']
    writes_to = (args.out_dir or os.path.join(out_dir, 'predictions')) if args.predict else out_dir
    if os.path.exists(writes_to) and not os.path.isdir(writes_to):
        fail(f'--out-dir {writes_to}: a file, not a folder: pass a folder')
    if args.predict:
        if not os.path.exists(args.predict):
            fail(f'--predict {args.predict}: no such file or folder')
        device = pick_device(cfg['device'])
        amp_dtype, _, why = pick_precision(cfg['amp'], device)
        print(f'{path}: step {model.step}, {cfg["dataset"]}, {cfg["backbone"]} backbone; {device}, {why}')
        with one_line_errors(out_dir):
            predict_images(model.to(device), args.predict, args.out_dir or os.path.join(out_dir, 'predictions'),
                           device, amp_dtype)
        return
    read_baselines(cfg)  # a bad --baselines stops here, before the first step or image
    if args.eval_only:
        check_eval_dir(out_dir, path)
    device, world, rank = setup_distributed(cfg['device'])  # under torchrun, evaluation is sharded too
    pool = edge_pool(cfg)
    try:
        with one_line_errors(out_dir):
            if args.eval_only:
                eval_only(cfg, model, path, device=device, world=world, rank=rank, pool=pool)
            else:  # rank 0 alone writes the outputs, so it alone holds the out-dir
                with hold_out_dir(out_dir) if rank == 0 else contextlib.nullcontext():
                    if rank == 0:  # (no other run can start there now)
                        check_out_dir(out_dir, path, ckpt and ckpt['step'], args.rewind)
                        remove_temporaries(out_dir)  # (of atomic_write calls that a kill interrupted)
                    train(cfg, device, world, rank, (path, ckpt) if ckpt else None, pool)
        PEERS.finish()
    except BaseException as e:
        if pool:  # interrupted or failed: the images still being scored are of no use
            pool.stop()
        if world > 1:  # the other processes stop too (this one with one line if another failed first)
            PEERS.stop(e)
        raise
    finally:
        if pool:
            pool.shutdown(cancel_futures=True)
        if dist.is_initialized():
            dist.destroy_process_group()


def eval_only(cfg, model, path, *, device, world, rank, pool):
    """--eval-only: the checkpoint's model on the val split, reported as training's evaluations are (its
    line in metrics.jsonl tagged with the checkpoint's path); its summary line says how long it took."""
    model.to(device)
    log(f'{path}: step {model.step}, {cfg["dataset"]}, {cfg["backbone"]} backbone; {device} x {world}, fp32')
    (val_ds,) = open_datasets(cfg, splits=('val',))
    if is_main():
        writable(cfg['out_dir'])  # (now, not after the evaluation)
    save_to = predictions_folder(cfg, model.step, tag=path)
    evaluation = evaluate(model, shard_loader(val_ds, cfg, world, rank), dataset=cfg['dataset'], device=device,
                          keep=PANELS, pool=pool, save_to=save_to)
    report(cfg, model, model.step, evaluation, tag=path, save_to=save_to)


if __name__ == '__main__':
    main()
