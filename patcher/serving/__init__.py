"""`sasa-serve`: OpenAI's chat-completions API over the SASA ONNX artifact (see the README's Serving section).

Small modules with one job each: `protocol` (request validation, response shapes, errors), `images`
(image URLs to Pillow images, with limits), `text` (incremental decoding and stop strings), `runtime`
(one completion on ONNX Runtime GenAI or the project's runtime), `scheduler` (bounded queue and workers),
`metrics` (Prometheus text), `app` (the Starlette application). No safety logic here: the artifact's
runtime decides, the server reports its verdict.
"""
