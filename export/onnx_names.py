"""Names and constants the ONNX exporter and the torch-free runtime share (no torch, no onnx here)."""

ONNX_DIRNAME = "onnx"
CONFIG_NAME = "sasa_onnx.json"
PARITY_NAME = "parity.json"
VISION_FILE = "vision_encoder.onnx"
EMBED_FILE = "embed_tokens.onnx"
DECODER_FILE = "decoder_model_merged.onnx"
TOKENIZER_FILE = "tokenizer.json"
# The graphs of an artifact, by their key in sasa_onnx.json / genai_config.json.
GRAPHS = ("vision_encoder", "embed_tokens", "decoder")
FORMAT_VERSION = 1
# The decode branch of the probe `If` returns this: "not computed on this step".
UNSAFE_PROB_NOT_COMPUTED = -1.0
