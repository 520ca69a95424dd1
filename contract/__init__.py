"""The contract between spotune's layers, in one torch-free package.

`orchestrator/` (the control plane), `launch/` (the backends) and `recipes/` (the training
recipe on the node) each import this package and none of each other; it imports none of them.

- `contract.errors`    UserError: a problem the user can fix, shown as one line, exit code 2.
- `contract.spec`      the job spec: its training sections (what the recipe runs) composed with
                       the planning sections (constraints, local, sky) into JobSpec; one loader.
- `contract.placement` Placement: where an attempt runs and what an hour of it costs.
- `contract.execution` ExecutionConfig: how a run trains (micro-batch, checkpointing, attention,
                       dtype, sharding), decided once by the plan and run by the recipe.
- `contract.backend`   LaunchRequest, Observation, ObservedAttempt, the Backend protocol and the
                       registry of backend names.
- `contract.events`    the recipe's process contract: exit codes, event names and payloads, the
                       events.jsonl writer, and the one JSONL reader and tailer.
- `contract.dataset`   training data read once for both sides: formats, masks, file:line errors,
                       the validation split, block order and the tokens a run trains.
- `contract.tokenizer` a model's tokenizer and chat template without torch (tiny-llama's defined here).
- `contract.files`     reading what the user names: regular files only, size and line limits, UTF-8,
                       a JSON depth limit, path length checks; each refusal one FileInputError line.
"""
