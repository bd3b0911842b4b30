"""SFTDataset: every conversation of the given files read, normalised and tokenised up front."""

from nemo_aligner.data.dataset import TokenizedDataset, fingerprint_files
from nemo_aligner.data.sft.rows import SFTColumns, sft_example_from_row
from nemo_aligner.data.sft.tokenize import SFTTokenizeSettings, tokenize_sft


class SFTDataset(TokenizedDataset):
    unit = "examples"

    @classmethod
    def from_files(cls, files, tokenizer, settings: SFTTokenizeSettings, columns: SFTColumns = SFTColumns(),
                   name: str = "data") -> "SFTDataset":
        examples, report, source_rows = cls.read(files, lambda row, where: sft_example_from_row(row, where, columns),
                                                 lambda example: tokenize_sft(example, tokenizer, settings), name)
        dataset = cls(examples, report, fingerprint_files(report.files, tokenizer.fingerprint(), settings.key(),
                                                          columns.__dict__))
        dataset.source_rows = source_rows
        return dataset


def options_from_config(model_cfg) -> tuple[SFTTokenizeSettings, SFTColumns]:
    """What turns rows into examples (model.data.*): tokenisation settings and column names."""
    data = model_cfg.data
    settings = SFTTokenizeSettings(seq_length=model_cfg.seq_length, overlength=data.overlength,
                                   chat_template=data.chat_template, loss_on=data.loss_on, add_bos=data.add_bos,
                                   add_eos=data.add_eos)
    columns = SFTColumns(row_format=data.row_format, system_key=data.system_key, prompt_key=data.prompt_key,
                         query_key=data.query_key, response_key=data.response_key)
    return settings, columns
