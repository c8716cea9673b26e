"""The job's input side: read a dataset (one file, or many: a folder, a glob, a list, a
`save_to_disk` folder; local or on an object store), check its rows, tokenise it (masking the loss
to the completion or assistant tokens of instruction data) and fingerprint it.

    files         the files a dataset names, their formats          `dataset_files`, `Source`
    readers       the files as checked tables, a batch at a time    `read_table`, `read_dataset`, `read_files`
    checks        the row checks and their errors                   `DataError`, `Rejection`
    tokenizing    tokens, truncation, loss masks, chat templates    `tokenize`, `Tokenized`
    fingerprints  equal inputs, equal fingerprints                  `fingerprint`
    plan          a job's train and query sets                      `plan_job`, `Plan`

Pure functions, no Ray. Which rank computes which example is the gradient pass's business
(`distinf.partition`), and so is collating a step's examples (`distinf.batching.collate`).
"""

from distinf.inputs.checks import DataError, Rejection
from distinf.inputs.files import Source, dataset_files
from distinf.inputs.fingerprints import fingerprint
from distinf.inputs.plan import Plan, plan_job
from distinf.inputs.readers import read_dataset, read_files, read_table
from distinf.inputs.tokenizing import Tokenized, tokenize

__all__ = ["DataError", "Plan", "Rejection", "Source", "Tokenized", "dataset_files", "fingerprint", "plan_job",
           "read_dataset", "read_files", "read_table", "tokenize"]
