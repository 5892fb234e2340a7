"""Task adaptation: fine-tune a base model (`pagellm finetune`) and evaluate it in the engine (`pagellm evaluate`).

    data.py        JSONL/CSV rows -> checked examples and the label set (InvalidRequest before any model loads)
    base_model.py  --model -> encoder or decoder; config (dropout, labels) and weights for training
    strategy.py    head | top-layers:K | full | lora | adalora | prefix: what trains
    features.py    token rows: encoder classes, decoder label words (pagellm.label_prompt), SFT
    metrics.py     dev accuracy / macro-F1 inside the Trainer
    callbacks.py   per-evaluation dev report; AdaLoRA rank allocation and best-adapter keeping
    trainer.py     the transformers Trainer of a run
    finetune.py    FinetuneArgs -> run_finetune -> FinetuneResult
    outputs.py     model/adapter folder, merged/, pagellm_task.json, train_report.json
    evaluate.py    EvaluateArgs -> run_evaluate (through pagellm.LLM) -> EvaluateResult
    report.py      classification report, confusion matrix, before/after table

Nothing here imports torch, transformers or peft at module level except callbacks.py and trainer.py, which
only finetune's run imports, so `pagellm --help` stays fast.
"""
