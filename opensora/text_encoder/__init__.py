"""Text encoder: T5 v1.1 (encoder only) with its SentencePiece tokenizer and caption cleaning."""
from opensora.text_encoder.clean import clean_caption, text_preprocessing
from opensora.text_encoder.embedder import LoadReport, T5Embedder, load_hf_t5_weights
from opensora.text_encoder.t5 import T5Config, T5Encoder
from opensora.text_encoder.tokenizer import T5Tokenizer, train_sentencepiece

__all__ = ["T5Config", "T5Encoder", "T5Tokenizer", "train_sentencepiece", "T5Embedder", "load_hf_t5_weights",
           "LoadReport", "clean_caption", "text_preprocessing"]
