"""The Hugging Face Hub: checks and publishing of backbone folders (`publishing`, command line `cli`:
`selfpatch-push`), the one upload path in the foreground and the background (`uploads`), bounds on every request
(`request_limits`) and model cards (`cards`)."""
