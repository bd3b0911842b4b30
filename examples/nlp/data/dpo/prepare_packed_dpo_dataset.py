"""Pack a DPO dataset offline: whole chosen+rejected pairs into packs of `pack_size` tokens, so training
wastes no compute on padding. NeMo-Aligner's command line, with the same data options as training:

    python examples/nlp/data/dpo/prepare_packed_dpo_dataset.py \\
        "model.data.data_prefix={train: [train.jsonl], validation: [val.jsonl]}" \\
        model.encoder_seq_length=2048 \\
        +tokenizer_path=/models/Llama-3.2-1B-Instruct +tokenizer_type=huggingface \\
        +output_dir=/data/packed +pack_sizes=[4096,8192] \\
        +packing_algorithm=first_fit_shuffle ++model.seed=1234

Writes <output_dir>/packed_{pack_size}_seed{seed}.{split}.safetensors per pack size and split (no
pickle; format in nemo_aligner/data/preference/packed_file.py) and prints packs, pairs, pairs per pack, packing
efficiency and the model.global_batch_size (in packs) that keeps the pairs per step unchanged.
Train with model.data.data_impl=packed_jsonl model.encoder_seq_length=<pack_size> and data_prefix
pointing at the files. Keys: nemo_aligner/recipes/prepare_packed_dpo.py; base config: gpt_dpo.yaml.
"""

from nemo_aligner.cli import run_command

if __name__ == "__main__":
    run_command("pack")  # the same as `nemo-aligner pack ...` (nemo_aligner/cli.py)
