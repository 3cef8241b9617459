"""Sleep policies: what is planned next, when and why, as pure code over the clock."""
