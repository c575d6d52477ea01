"""``metabench``: list, eval, check, submit, merge, keys, leaderboard, calibrate, discover,
bench."""

from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import sys
from pathlib import Path

import numpy as np

RUNS_DIR = Path("runs")


def _fmt(x, digits: int = 3) -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "-"
    return f"{x:.{digits}g}" if abs(x) < 1e4 else f"{x:.3e}"


def _interval(d: dict) -> str:
    return f"{d['point']:.3f} [{d['lo']:.3f}, {d['hi']:.3f}]"


def cmd_list(args) -> int:
    from metabench import envs, families
    from metabench.tasks import spec

    if args.what == "tasks":
        for t in spec.list_tasks():
            try:
                s = spec.load(t)
                print(f"{t:32s} families={','.join(s.families())}  "
                      f"test={','.join(e.name for e in s.test)}  "
                      f"steps={s.total_timesteps:.3g}  seeds={s.budget.seeds}")
            except Exception as e:  # one broken spec must not hide the others
                print(f"{t:32s} INVALID: {e}")
    elif args.what == "envs":
        for i in envs.registered():
            e = envs.entry(i)
            extra = f"  ({e.note})" if e.note else ""
            print(f"{i}{'' if e.jittable else '  [host-stepped]'}{extra}")
    elif args.what == "families":
        for f in families.families():
            fam = families.get_family(f)
            print(f"{f:10s} {fam.description}  (baseline: {fam.baseline})")
    else:
        for f in families.families():
            for name, info in sorted(families.get_family(f).reference_rules.items()):
                print(f"{name:12s} {f:8s} {info.description}  [{info.citation}]")
    return 0


def _record_path(out_dir: Path, task_id: str, split: str, rule: str) -> Path:
    return out_dir / task_id / split / f"{rule}.json"


def _print_record(rec: dict) -> None:
    print(f"\n{rec['rule']['name']} ({rec['rule']['family']}) on {rec['task']['id']} "
          f"[{rec['task']['split']}], {len(rec['task']['seeds'])} seeds, status {rec['status']}")
    if rec["rule"]["note"]:
        print(f"  note: {rec['rule']['note']}")
    print(f"  {'env':24s} {'return (mean ± sd)':>22s} {'score':>7s} {'env steps/s':>12s} "
          f"{'compile':>8s} {'run':>7s}")
    for e in rec["envs"]:
        finals = [r["final_return"] for r in rec["runs"]
                  if r["env"] == e["name"] and r["final_return"] is not None]
        ret = (f"{np.mean(finals):.1f} ± {np.std(finals):.1f}" if finals else "failed")
        print(f"  {e['name']:24s} {ret:>22s} {_fmt(e['mean_score']):>7s} "
              f"{e['env_steps_per_s']:>12,.0f} {e['compile_s']:>7.1f}s {e['run_s']:>6.1f}s")
    for r in rec["runs"]:
        if r["status"] != "ok":
            print(f"  FAILED {r['env']} seed {r['seed']}: {r['reason']}")
    a = rec["aggregates"]
    print("  normalised score, 95% stratified-bootstrap CI:")
    print(f"    IQM {_interval(a['iqm'])}   mean {_interval(a['mean'])}   "
          f"median {_interval(a['median'])}   optimality gap {_interval(a['optimality_gap'])}")
    poi = rec.get("probability_of_improvement")
    if poi:
        print(f"    P({rec['rule']['name']} > {poi['baseline']}) {_interval(poi)}")


def cmd_eval(args) -> int:
    from metabench import harness, results
    from metabench.tasks import spec

    task = spec.load(args.task)
    out_dir = Path(args.out_dir)
    from metabench.progress import Reporter

    progress = None if args.quiet else Reporter()
    rules = list(dict.fromkeys(args.rules))
    if args.out and len(rules) > 1:
        raise SystemExit("--out takes one rule; use --out-dir for several")
    refs = [harness.reference_rule(r) for r in rules]
    # The baseline first, so the others get a probability of improvement over it.
    refs.sort(key=lambda r: r.name != task.scoring.baselines.get(r.family))
    command = "metabench " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    for ref in refs:
        baseline_name = task.scoring.baselines.get(ref.family)
        baseline = None
        if baseline_name and baseline_name != ref.name:
            bpath = _record_path(out_dir, task.id, args.split, baseline_name)
            if bpath.exists():
                b = results.read(bpath)
                seeds = args.seeds or task.budget.seeds
                if (b["task"]["fingerprint"] == task.fingerprint(ref.family)
                        and len(b["task"]["seeds"]) == seeds):
                    baseline = b
        if ref.note:
            print(f"{ref.name}: {ref.note}", file=sys.stderr)
        rec = harness.evaluate(ref, task, args.split, seeds=args.seeds, progress=progress,
                               baseline=baseline, command=command)
        path = Path(args.out) if args.out else _record_path(out_dir, task.id, args.split,
                                                             ref.name)
        results.write(path, rec)
        _print_record(rec)
        if baseline is None and baseline_name and baseline_name != ref.name:
            print(f"    (no probability of improvement: no {baseline_name} record for this "
                  f"task and seed count in {out_dir}; evaluate {baseline_name} first)")
        print(f"  record: {path}")
    if progress is not None:
        progress.close()
    return 0


def cmd_calibrate(args) -> int:
    from metabench.tasks import calibrate, spec

    task = spec.load(args.task)
    calibrate.calibrate(task, force=args.force)
    task = spec.load(args.task)
    print(f"{task.id}: fingerprint {task.fingerprint()}")
    return 0


# One env per backend: brax (every physics), gymnasium (sync and async), pettingzoo.
BACKEND_BENCH_ENVS = ["brax/ant", "gymnasium/CartPole-v1", "gymnasium/HalfCheetah-v5",
                      "pettingzoo/mpe.simple_spread_v3", "gymnax/CartPole-v1"]


BENCH_ALGOS = ["ppo", "dqn", "epg", "metagrad", "lpg"]
"""``bench --algo`` choices: the keys of ``bench.PAIRS`` (a test keeps them equal)."""


def cmd_bench(args) -> int:
    from metabench import bench

    if args.backends:
        rows = bench.backend_rows(bench.backend_entries(args.env or BACKEND_BENCH_ENVS,
                                                        num_envs=args.num_envs),
                                  num_envs=args.num_envs, steps=args.steps,
                                  repeats=1 if args.quick else 3)
        print(bench.format_backend_table(rows))
        if args.json:
            Path(args.json).write_text(json.dumps(rows, indent=1))
        return 0
    if args.time_to_score is not None:
        folders = args.time_to_score or [f"submissions/baselines/{r}" for r in
                                         ("ppo_clip", "dqn", "a2c_fixed", "reinforce")]
        rows = bench.time_to_score(folders)
        print(f"seconds, 2 runs per rule on {bench.TIME_TO_SCORE_TASK}: a new rule (an empty "
              "compilation cache), then a re-score")
        print(bench.format_time_to_score(rows))
        if args.json:
            Path(args.json).write_text(json.dumps(rows, indent=1))
        return 0
    if args.export:
        rows = [bench.export_row(e, int(args.timesteps or (bench.QUICK_STEPS if args.quick
                                                           else 100_000)), algo,
                                 repeats=1 if args.quick else 5)
                for algo in args.algo or tuple(bench.PAIRS)
                for e in args.env or ["gymnax/CartPole-v1"]]
        print(bench.format_export_table(rows))
        if args.json:
            Path(args.json).write_text(json.dumps(rows, indent=1))
        return 0
    rows = bench.run(env_id=args.env, total_timesteps=args.timesteps, seeds=tuple(args.seeds),
                     quick=args.quick, algos=args.algo or tuple(bench.PAIRS),
                     devices=tuple(args.devices or (None,)))
    print(bench.format_table(rows))
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    if args.plot:
        Path(args.plot).write_text(bench.plot_html(rows))
        print(f"plot: {args.plot}")
    return 0


def cmd_discover_evolve(args) -> int:
    from metabench.tasks import spec
    from metabench.discover.evolution import EvolveConfig, evolve

    task = spec.load(args.task)
    cfg = EvolveConfig(population=args.population, tournament=args.tournament,
                       children=args.children, generations=args.generations,
                       graph_nodes=args.graph_nodes,
                       bootstrap=None if args.bootstrap == "none" else args.bootstrap,
                       seeds=args.seeds, timesteps=_int_or_none(args.timesteps),
                       hurdle_timesteps=_int_or_none(args.hurdle_timesteps),
                       hurdle_threshold=None if args.no_hurdle else args.hurdle_threshold,
                       hurdle_env=args.hurdle_env, seed=args.seed,
                       fitness={"all": "all_episodes", "final": "final_window"}[args.fitness])
    out = Path(args.out) if args.out else RUNS_DIR / "discover" / "evolve" / \
        f"{task.id}-seed{cfg.seed}"
    command = "metabench " + " ".join(shlex.quote(a) for a in args.argv)
    res = evolve(task, cfg, out, command=command, author=args.author)
    s = res.summary
    print(f"\nbest fitness {res.best.fitness:.3f} (individual {res.best.id}, generation "
          f"{res.best.generation}): {s['best']['equation']}")
    print(f"{s['individuals']} individuals, {s['trained']} trained, {s['cached']} cached "
          f"(duplicate hash), {s['hurdle_failed']} stopped at the hurdle, "
          f"{s['no_q_gradient']} without a gradient in Q; {s['env_steps']:,} env steps in "
          f"{s['wall_s']:.0f}s")
    print(f"history: {out / 'history.jsonl'}\nsubmission: {out / 'submission'}  "
          f"(metabench submit {out / 'submission'} --task TASK)")
    return 0


def cmd_discover_lpg(args) -> int:
    from metabench.tasks import spec
    from metabench.discover.lpg import LPGDiscoverConfig, discover

    task = spec.load(args.task)
    cfg = LPGDiscoverConfig(meta_steps=args.meta_steps, lifetimes=args.lifetimes,
                            inner_updates=args.inner_updates,
                            lifetime_updates=_int_or_none(args.lifetime_updates),
                            meta_lr=args.meta_lr, meta_adam_eps=args.meta_adam_eps,
                            hidden=args.hidden,
                            critic_lr=args.critic_lr, critic_lambda=args.critic_lambda,
                            beta_pi_entropy=args.beta_pi_entropy,
                            beta_y_entropy=args.beta_y_entropy,
                            beta_pi_hat=args.beta_pi_hat, beta_y_hat=args.beta_y_hat,
                            probe_every=args.probe_every,
                            lr_arms=tuple(args.lr_arm or ()),
                            alpha_y_arms=tuple(args.alpha_y_arm or ()), seed=args.seed,
                            checkpoint_every=args.checkpoint_every,
                            max_nonfinite_steps=args.max_nonfinite_steps)
    out = Path(args.out) if args.out else RUNS_DIR / "discover" / "lpg" / \
        f"{task.id}-seed{cfg.seed}"
    command = "metabench " + " ".join(shlex.quote(a) for a in args.argv)
    res = discover(task, cfg, out, command=command, author=args.author)
    s = res.summary
    first, last = s["curve_first"], s["curve_last"]
    if first and last:
        print(f"\nmeta-objective {first['objective']:+.4f} -> {last['objective']:+.4f} over "
              f"{s['meta_steps']} meta-steps; {s['env_steps']:,} env steps in {s['wall_s']:.0f}s")
    print(f"curve: {out / 'curve.jsonl'}\nsubmission: {out / 'submission'}")
    return 0


def cmd_discover_es(args) -> int:
    """``discover lpo`` and ``discover epg``: OpenAI-ES on a reference rule's network."""
    from metabench.tasks import spec
    from metabench.discover import es

    task = spec.load(args.task)
    cfg = es.ESConfig(generations=args.generations, population=args.population,
                      sigma_init=args.sigma, sigma_decay=args.sigma_decay,
                      sigma_limit=args.sigma_limit, lr=args.lr, seeds=args.seeds,
                      timesteps=_int_or_none(args.timesteps), seed=args.seed,
                      checkpoint_every=args.checkpoint_every)
    out = Path(args.out) if args.out else RUNS_DIR / "discover" / args.method / \
        f"{task.id}-seed{cfg.seed}"
    command = "metabench " + " ".join(shlex.quote(a) for a in args.argv)
    discover = {"lpo": es.discover_lpo, "epg": es.discover_epg}[args.method]
    res = discover(task, cfg, out, command=command, author=args.author)
    s = res.summary
    if s["curve_first"] and s["curve_last"]:
        print(f"\nfitness (population mean) {s['curve_first']['fitness_mean']:.3f} -> "
              f"{s['curve_last']['fitness_mean']:.3f} over {s['generations']} generations; "
              f"{s['env_steps']:,} env steps in {s['wall_s']:.0f}s")
    print(f"curve: {out / 'curve.jsonl'}\nsubmission: {out / 'submission'}")
    return 0


def _int_or_none(x):
    return None if x is None else int(float(x))


def cmd_check(args) -> int:
    from metabench import submissions

    failed = 0
    for folder in args.dirs:
        res = submissions.check(folder, timeout=args.timeout, unsandboxed=args.unsandboxed)
        print(res.message)
        failed += not res.ok
    return 1 if failed else 0


def _submission_order(dirs: list[str], task) -> list[str]:
    """Baselines first, so that every other submission gets its probability of improvement."""
    baselines = set(task.scoring.baselines.values())
    return sorted(dirs, key=lambda d: Path(d).resolve().name not in baselines)


def cmd_submit(args) -> int:
    from metabench import submissions
    from metabench.tasks import spec

    task = spec.load(args.task)
    shard = submissions.parse_shard(args.shard)
    command = "metabench " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    folders = []
    for folder in _submission_order(args.dirs, task):
        if len(args.dirs) > 1:
            # A glob over submissions/ spans families; the task's own are scored, the rest
            # are named and skipped rather than failing the batch.
            try:
                family = submissions.load(folder).family
            except submissions.SubmissionError:
                family = None
            if family is not None and family not in task.families():
                print(f"{folder}: skipped, task {task.id} has no {family} agent "
                      f"(it scores {', '.join(task.families())})")
                continue
        folders.append(folder)
    if args.batch and args.backend != "local":
        print("--batch trains submissions together in one local process; it cannot be "
              "combined with --backend ray", file=sys.stderr)
        return 2
    failed = 0
    for res in _submit_each(folders, args, task, shard, command):
        if res.record is not None and "unchanged" not in res.message:
            _print_record(res.record)
        print(res.message)
        failed += not res.ok
    return 1 if failed else 0


def _submit_each(folders, args, task, shard, command):
    """Results one by one as they are scored (all at the end with --batch)."""
    from metabench import submissions

    kw = dict(results_dir=Path(args.results), force=args.force, shard=shard, seeds=args.seeds,
              timeout=args.timeout, command=command, backend=args.backend,
              address=args.address, key_path=args.key, unsandboxed=args.unsandboxed)
    if args.batch:
        yield from submissions.submit_many(folders, args.task, args.split, batch=True, **kw)
    else:
        for folder in folders:
            yield submissions.submit(folder, args.task, args.split, **kw)


def cmd_merge(args) -> int:
    from metabench import submissions

    res = submissions.merge(args.shards, results_dir=Path(args.results),
                            out=Path(args.out) if args.out else None, task=args.task,
                            key_path=args.key)
    if res.record is not None:
        _print_record(res.record)
    print(res.message)
    return 0 if res.ok else 1


def cmd_keys(args) -> int:
    """This machine's signing key: create it, show its public half, or re-sign records a
    maintainer has reviewed (in place, changing nothing but the signature)."""
    from metabench import results, signing

    path = Path(args.path).expanduser() if args.path else signing.default_key_path()
    if args.action != "sign" and args.records:
        print(f"metabench: error: `keys {args.action}` takes no records", file=sys.stderr)
        return 2
    if args.action == "init":
        key = signing.init_key(path, force=args.force)
        print(signing.public_key_text(key))
        print(f"wrote the private key to {path} (mode 0600; keep it on this machine only)")
        print(f"key id {signing.key_id(key)}: to have the leaderboard trust records this key "
              "signs, add the line above to leaderboard/keys/NAME.pub")
        return 0
    key = signing.load_private_key(path)
    if args.action == "show":
        print(signing.public_key_text(key))
        print(f"key id {signing.key_id(key)} ({path})")
        return 0
    if not args.records:
        print("metabench: error: `keys sign` needs record file(s)", file=sys.stderr)
        return 2
    for rec_path in args.records:
        results.write(rec_path, signing.sign(results.read(rec_path), key))
        print(f"signed {rec_path} (key id {signing.key_id(key)})")
    return 0


def cmd_leaderboard(args) -> int:
    if args.action == "build":
        from metabench.site.build import build

        index = build(Path(args.results), Path(args.out),
                      tasks_dir=Path(args.tasks) if args.tasks else None,
                      keys_dir=Path(args.keys) if args.keys else None)
        print(f"leaderboard built: open {index.resolve().as_uri()} "
              f"(or run `metabench leaderboard serve`)")
    else:
        from metabench.site.serve import serve

        serve(Path(args.out), port=args.port, host=args.host)
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="metabench", description=__doc__)
    p.add_argument("--no-compile-cache", action="store_true",
                   help="do not use the persistent compilation cache (default: on, in "
                        "~/.cache/metabench/xla; METABENCH_COMPILATION_CACHE=0 does the same)")
    sub = p.add_subparsers(dest="command", required=True)

    lp = sub.add_parser("list", help="list tasks, envs, families or rules")
    lp.add_argument("what", choices=["tasks", "envs", "families", "rules"])
    lp.set_defaults(fn=cmd_list)

    ep = sub.add_parser("eval", help="train fresh agents with reference rules and score them")
    ep.add_argument("rules", nargs="+", help="reference rule name(s), e.g. ppo_clip dpo lpo")
    ep.add_argument("--task", required=True, help="task id (see `metabench list tasks`)")
    ep.add_argument("--split", default="test", choices=["test", "train"])
    ep.add_argument("--seeds", type=int, default=None, help="override the task's seed count")
    ep.add_argument("--out", default=None, help="record file (one rule only)")
    ep.add_argument("--out-dir", default=str(RUNS_DIR),
                    help="where records go: OUT_DIR/<task>/<split>/<rule>.json (default runs/)")
    ep.add_argument("--quiet", action="store_true", help="no progress lines")
    ep.set_defaults(fn=cmd_eval)

    kp = sub.add_parser("check", help="validate submission folder(s) and run conformance checks")
    kp.add_argument("dirs", nargs="+", help="submission folder(s)")
    kp.add_argument("--timeout", type=float, default=300.0,
                    help="seconds allowed to import and check the rule")
    kp.add_argument("--unsandboxed", action="store_true",
                    help="run the submission's code without the sandbox, where this machine "
                         "cannot sandbox (only for code you trust; the record says so)")
    kp.set_defaults(fn=cmd_check)

    sp = sub.add_parser("submit", help="check, score in an isolated process, record the result")
    sp.add_argument("dirs", nargs="+", help="submission folder(s)")
    sp.add_argument("--task", required=True)
    sp.add_argument("--split", default="test", choices=["test", "train"])
    sp.add_argument("--results", default="leaderboard/results", help="results folder")
    sp.add_argument("--force", action="store_true", help="score again even if unchanged")
    sp.add_argument("--backend", choices=["local", "ray"], default="local",
                    help="local: one child process per submission; ray: one Ray task per env "
                         "(pip install 'metabench[ray]')")
    sp.add_argument("--address", default=None,
                    help="Ray cluster address (default: start a local Ray instance)")
    sp.add_argument("--batch", action="store_true",
                    help="train submissions of one reference factory and arguments, or loss "
                         "graphs of one family, together: one compiled call per env with "
                         "their meta-parameters vmapped (each still gets its own record)")
    sp.add_argument("--shard", default=None, help="score slice I/N of the (env, seed) cells")
    sp.add_argument("--seeds", type=int, default=None, help="override the task's seed count")
    sp.add_argument("--key", default=None,
                    help="signing key (default: $METABENCH_KEY or "
                         "~/.config/metabench/signing_key.pem); none: the record is unsigned")
    sp.add_argument("--timeout", type=float, default=None,
                    help="wall-clock limit of the scoring process (default: from the task)")
    sp.add_argument("--unsandboxed", action="store_true",
                    help="run the submission's code without the sandbox, where this machine "
                         "cannot sandbox (only for code you trust; the record says so)")
    sp.set_defaults(fn=cmd_submit)

    mp = sub.add_parser("merge", help="join shard records into one result record")
    mp.add_argument("shards", nargs="+", help="shard record files")
    mp.add_argument("--results", default="leaderboard/results")
    mp.add_argument("--out", default=None, help="output record (default: the results folder)")
    mp.add_argument("--task", default=None, help="task id or YAML (default: the shards' task)")
    mp.add_argument("--key", default=None, help="signing key of the merged record (as submit)")
    mp.set_defaults(fn=cmd_merge)

    kyp = sub.add_parser("keys", help="this machine's record-signing key: init, show, sign")
    kyp.add_argument("action", choices=["init", "show", "sign"])
    kyp.add_argument("records", nargs="*", help="record file(s) to re-sign in place (sign)")
    kyp.add_argument("--path", default=None,
                     help="key file (default: $METABENCH_KEY or "
                          "~/.config/metabench/signing_key.pem)")
    kyp.add_argument("--force", action="store_true", help="init: replace an existing key")
    kyp.set_defaults(fn=cmd_keys)

    lb = sub.add_parser("leaderboard", help="build or serve the static leaderboard site")
    lb.add_argument("action", choices=["build", "serve"])
    lb.add_argument("--results", default="leaderboard/results")
    lb.add_argument("--out", default="leaderboard/site")
    lb.add_argument("--tasks", default=None,
                    help="task specs folder (default: the shipped metabench/tasks/)")
    lb.add_argument("--keys", default=None,
                    help="trusted public keys (default: keys/ beside the results folder)")
    lb.add_argument("--port", type=int, default=8000)
    lb.add_argument("--host", default="127.0.0.1")
    lb.set_defaults(fn=cmd_leaderboard)

    cp = sub.add_parser("calibrate", help="measure random-policy returns for a task")
    cp.add_argument("task")
    cp.add_argument("--force", action="store_true", help="re-measure calibrated envs too")
    cp.set_defaults(fn=cmd_calibrate)

    dp = sub.add_parser("discover", help="meta-train update rules on a task's train split")
    dsub = dp.add_subparsers(dest="method", required=True)
    ev = dsub.add_parser("evolve", help="regularised evolution over td_loss loss graphs "
                         "(Co-Reyes et al. 2021)")
    ev.add_argument("--task", required=True, help="task id or YAML with a td_loss agent")
    ev.add_argument("--population", type=int, default=16)
    ev.add_argument("--tournament", type=int, default=4)
    ev.add_argument("--children", type=int, default=4,
                    help="children per generation, trained in one compiled call")
    ev.add_argument("--generations", type=int, default=8)
    ev.add_argument("--graph-nodes", type=int, default=10, help="non-input nodes per graph")
    ev.add_argument("--bootstrap", default="dqn",
                    help="library graph seeding the population (dqn, dqn_reg, dqn_clipped) "
                         "or 'none' for random graphs")
    ev.add_argument("--seeds", type=int, default=2, help="agents per candidate and env")
    ev.add_argument("--timesteps", default=None, help="env steps per agent (default: task's)")
    ev.add_argument("--hurdle-timesteps", default=None,
                    help="env steps on the hurdle (default: a third of --timesteps)")
    ev.add_argument("--hurdle-threshold", type=float, default=0.01,
                    help="normalised hurdle score needed for a full evaluation (0.05 suits "
                         "--fitness final)")
    ev.add_argument("--no-hurdle", action="store_true", help="evaluate every child fully")
    ev.add_argument("--hurdle-env", default=None, help="train env name (default: the first)")
    ev.add_argument("--seed", type=int, default=0, help="seed of the search")
    ev.add_argument("--fitness", choices=("all", "final"), default="all",
                    help="all: normalised return averaged over all training episodes (the "
                         "paper's objective); final: over the task's final scoring window")
    ev.add_argument("--out", default=None,
                    help="output folder (default runs/discover/evolve/<task>-seed<seed>)")
    ev.add_argument("--author", default="metabench discover evolve",
                    help="author named in the written submission")
    ev.set_defaults(fn=cmd_discover_evolve)
    lg = dsub.add_parser("lpg", help="meta-gradient training of the Learned Policy Gradient "
                         "(Oh et al. 2020)")
    lg.add_argument("--task", required=True, help="task id or YAML with an lpg agent")
    lg.add_argument("--meta-steps", type=int, default=200)
    lg.add_argument("--lifetimes", type=int, default=8, help="parallel lifetimes per env")
    lg.add_argument("--inner-updates", type=int, default=5,
                    help="K agent updates per meta-step (differentiated through)")
    lg.add_argument("--lifetime-updates", default=None,
                    help="agent updates per lifetime (default: the task's budget)")
    lg.add_argument("--meta-lr", type=float, default=1e-3)
    lg.add_argument("--meta-adam-eps", type=float, default=1e-8,
                    help="Adam's epsilon on the rule's parameters (smaller lets the y head's "
                         "tiny meta-gradient move it at the full rate)")
    lg.add_argument("--hidden", type=int, default=32, help="LSTM units of the rule")
    lg.add_argument("--critic-lr", type=float, default=0.05,
                    help="Adam rate of the meta-critic that estimates the meta-objective's "
                         "advantage")
    lg.add_argument("--critic-lambda", type=float, default=0.9,
                    help="lambda of the meta-objective's GAE and the critic's returns")
    lg.add_argument("--beta-pi-entropy", type=float, default=0.01)
    lg.add_argument("--beta-y-entropy", type=float, default=0.001)
    lg.add_argument("--beta-pi-hat", type=float, default=0.001)
    lg.add_argument("--beta-y-hat", type=float, default=0.001)
    lg.add_argument("--probe-every", type=int, default=0,
                    help="meta-steps between probes of what y predicts (0: never)")
    lg.add_argument("--lr-arm", type=float, action="append", default=None,
                    help="an agent learning rate for the balancing bandit (repeat)")
    lg.add_argument("--alpha-y-arm", type=float, action="append", default=None,
                    help="an agent alpha_y for the balancing bandit (repeat)")
    lg.add_argument("--checkpoint-every", type=int, default=10)
    lg.add_argument("--max-nonfinite-steps", type=int, default=10,
                    help="meta-steps in a row with a non-finite meta-gradient that are skipped "
                         "(lifetimes restarted) before the run stops")
    lg.add_argument("--seed", type=int, default=0)
    lg.add_argument("--out", default=None,
                    help="output folder (default runs/discover/lpg/<task>-seed<seed>); an "
                         "existing checkpoint there is resumed")
    lg.add_argument("--author", default="metabench discover lpg")
    lg.set_defaults(fn=cmd_discover_lpg)
    for method, family, what in (
            ("lpo", "drift", "OpenAI-ES on LPO's drift network (Lu et al. 2022)"),
            ("epg", "epg", "OpenAI-ES on EPG's loss network (Houthooft et al. 2018)")):
        esp = dsub.add_parser(method, help=what)
        esp.add_argument("--task", required=True,
                         help=f"task id or YAML with an agent config for {family}")
        esp.add_argument("--generations", type=int, default=50)
        esp.add_argument("--population", type=int, default=16,
                         help="even (antithetic pairs); LPO's paper used 32")
        esp.add_argument("--sigma", type=float, default=0.04, help="initial perturbation scale")
        esp.add_argument("--sigma-decay", type=float, default=0.999)
        esp.add_argument("--sigma-limit", type=float, default=0.01)
        esp.add_argument("--lr", type=float, default=0.01, help="Adam learning rate on the mean")
        esp.add_argument("--seeds", type=int, default=2, help="agents per candidate and env")
        esp.add_argument("--timesteps", default=None,
                         help="env steps per agent (default: task's)")
        esp.add_argument("--checkpoint-every", type=int, default=1)
        esp.add_argument("--seed", type=int, default=0)
        esp.add_argument("--out", default=None,
                         help=f"output folder (default runs/discover/{method}/<task>-seed<seed>)"
                              "; an existing checkpoint there is resumed")
        esp.add_argument("--author", default=f"metabench discover {method}")
        esp.set_defaults(fn=cmd_discover_es)

    bp = sub.add_parser("bench", help="harness vs minimal single-file implementations and the "
                                      "bare env, env steps per second")
    bp.add_argument("--env", action="append", default=None,
                    help="env id(s) (default gymnax/CartPole-v1 and gymnax/Breakout-MinAtar)")
    bp.add_argument("--timesteps", type=float, default=None, help="env steps per run")
    bp.add_argument("--seeds", type=int, nargs="+", default=[1],
                    help="seeds per run; several values measure scaling, e.g. 1 4 16 64 256")
    bp.add_argument("--algo", action="append", choices=BENCH_ALGOS, default=None,
                    help="ppo (drift: ppo_clip), dqn (td_loss: dqn), epg (epg: reinforce), "
                         "metagrad (metagrad: metagrad_gamma), lpg (lpg: actor_critic); "
                         "default all")
    bp.add_argument("--devices", type=int, nargs="+", default=None,
                    help="device counts the harness shards seeds over (METABENCH_DEVICES), "
                         "e.g. 1 2 4 8; on CPU force host devices with XLA_FLAGS="
                         "--xla_force_host_platform_device_count=N")
    bp.add_argument("--quick", action="store_true", help="CI-sized budgets")
    bp.add_argument("--json", default=None, help="also write the rows as JSON")
    bp.add_argument("--plot", default=None,
                    help="also write an HTML page plotting steps/s against seeds")
    bp.add_argument("--time-to-score", nargs="*", default=None, metavar="DIR",
                    help="wall-clock of `metabench submit` of each folder (default: the "
                         "baselines of the quick task's families) with a cold compilation "
                         "cache, then a re-score, split into its phases")
    bp.add_argument("--export", action="store_true",
                    help="each family's baseline in-process vs through its jax.export (the "
                         "path a submitted rule takes to the scorer)")
    bp.add_argument("--backends", action="store_true",
                    help="instead: env-only steps/s and compile time of each --env per "
                         "backend option (brax physics, gymnasium sync/async; default: one "
                         "env of each backend)")
    bp.add_argument("--num-envs", type=int, default=128, help="copies for --backends")
    bp.add_argument("--steps", type=int, default=200, help="steps per copy for --backends")
    bp.set_defaults(fn=cmd_bench)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    if args.no_compile_cache:
        os.environ["METABENCH_COMPILATION_CACHE"] = "0"  # the children inherit it (caches.py)
    if args.command in ("eval", "discover"):  # they compile here; submit's children do
        from metabench.harness import train

        train.use_compilation_cache()
    try:
        return args.fn(args)
    except BrokenPipeError:
        # The reader stopped early (``metabench list tasks | head``): not an error of ours.
        # Point stdout at /dev/null so the interpreter's final flush does not raise again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except (KeyError, ValueError, FileNotFoundError, OSError) as e:
        # Unknown names and malformed specs are the user's to fix: say what, not a traceback.
        msg = e.args[0] if isinstance(e, KeyError) and e.args else str(e)
        print(f"metabench: error: {msg}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
