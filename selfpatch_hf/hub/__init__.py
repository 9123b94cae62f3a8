"""The Hugging Face Hub: publishing folders (`publishing`), background uploads during training (`uploads`), bounds on
every request (`request_limits`) and model cards (`cards`)."""
