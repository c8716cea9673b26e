"""How much of each method's scores comes from curvature blocks whose gradient is float32 rounding
of zero, on a tiny GPT-2 under dropout (layer 1's attention bias keeps only key-bias entries, which
softmax ignores). Every damped method should leave such a block out: 0 on this tree.

    .venv/bin/python -m benchmarks.quality.zero_block_share [--k 256]

Prints, per hessian.method, the zero blocks' columns and max |their part of the influence| / max
|influence|. Run in a `git archive 1d1cda5` copy (with this file copied in), datainf and lissa
printed 0.81 and 0.19 before they shared gauss_newton's zero-block rule.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from benchmarks._harness import import_test_helpers

import torch  # noqa: E402  (after the harness: the offline environment first)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--k", type=int, default=256)
    args = parser.parse_args()
    import_test_helpers()
    import job_fixtures
    from transformers import AutoModelForCausalLM

    import distinf
    from distinf.api import solver_for
    from distinf.config import load_job
    from distinf.core.curvature import zero_blocks
    from distinf.core.solvers import block_traces
    from distinf.inputs import plan_job
    from distinf.runtime.reduce_score import curvature_slices

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        model_dir = job_fixtures.tiny_model_dir(root, "gpt2")
        train, queries = job_fixtures.corpus_files(root / "data")
        for method in ("gauss_newton", "datainf", "lissa", "identity"):
            extra = {"lissa_iterations": 4, "lissa_batch_size": 5} if method == "lissa" else {}
            cfg = load_job(job_fixtures.job_file(root, model_dir, train, queries,
                                                 compression={"method": "dropout", "k": args.k},
                                                 hessian={"method": method, **extra}))
            plan = plan_job(cfg)
            result = distinf.attribute(
                AutoModelForCausalLM.from_pretrained(cfg.model.path), plan.train.examples, plan.queries.examples,
                config=cfg.model_dump(include={"compression", "hessian", "scoring"}), train_ids=plan.train.ids,
                query_ids=plan.queries.ids, batch_size=3, pad_token_id=plan.pad_token_id)
            train_grads = torch.from_numpy(result.train_grads).double()
            slices = curvature_slices(result.index_set, "layer")
            zero = zero_blocks(block_traces(train_grads, slices), len(plan.train.ids), slices)
            solver = solver_for(cfg.hessian, slices, train_grads, plan.train.ids)
            preconditioned = solver.precondition(torch.from_numpy(result.query_grads))
            influence = preconditioned @ train_grads.T
            part = sum((preconditioned[:, slices[i]] @ train_grads[:, slices[i]].T for i in zero),
                       torch.zeros_like(influence))
            print(f"{method:13s} zero blocks {[(slices[i].start, slices[i].stop) for i in zero]}  "
                  f"max |zero blocks' part| / max |influence| = {float(part.abs().max() / influence.abs().max()):.3g}")


if __name__ == "__main__":
    main()
