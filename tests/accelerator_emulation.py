"""Make DeepSpeed's CPU accelerator answer as another machine's would, in this process or in every
Ray worker process (as the job's `worker_process_setup_hook`).

CPUs differ in what DeepSpeed's CPU accelerator reports: on an AMD EPYC, whose mkldnn lacks
float16, `is_fp16_supported()` returns None. `DISTINF_TEST_ACCELERATOR` names the answers, e.g.
"fp16=none,bf16=false"; the driver hands every DISTINF_TEST_* variable to its actors.

"zero_init=bfloat16" instead stands for a loading library that builds other weights than asked
(DeepSpeed 0.19.8's `zero.Init` on such a CPU): every `zero.Init` builds bfloat16.
"""

from __future__ import annotations

import os

VARIABLE = "DISTINF_TEST_ACCELERATOR"
ANSWERS = {"true": True, "false": False, "none": None}


def emulate(setting: str, patch=setattr) -> None:
    """Patch the classes as `setting` says; pass pytest's `monkeypatch.setattr` to undo it after a test."""
    import torch
    from deepspeed.accelerator.cpu_accelerator import CPU_Accelerator
    from deepspeed.runtime.zero import partition_parameters

    for item in filter(None, setting.split(",")):
        key, value = item.split("=")
        if key == "fp16":
            patch(CPU_Accelerator, "is_fp16_supported", lambda self, answer=ANSWERS[value]: answer)
        elif key == "bf16":
            patch(CPU_Accelerator, "is_bf16_supported", lambda self, answer=ANSWERS[value]: answer)
        elif key == "zero_init" and value == "bfloat16":
            def _set_dtype(self, ds_config, dtype):
                self.dtype = torch.bfloat16
            patch(partition_parameters.InsertPostInitMethodToModuleSubClasses, "_set_dtype", _set_dtype)
        else:
            raise ValueError(f"{VARIABLE}: unknown setting {item!r}")


def from_environment() -> None:
    """The Ray worker_process_setup_hook: emulate what the job's environment names."""
    if os.environ.get(VARIABLE):
        emulate(os.environ[VARIABLE])
