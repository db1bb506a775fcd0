"""cwm's settings: one TOML file, `CWM_*` environment variables, and flags.

Precedence, highest first: **flags > environment > file > defaults**. Each setting has one
key in the file (``[section] name``), one environment variable (``CWM_`` + the name in
upper case, without the section: ``serve.data_dir`` is ``CWM_DATA_DIR``) and, for most, a
flag. The file is the one named by ``--config FILE``, else by ``$CWM_CONFIG``, else
``$XDG_CONFIG_HOME/cwm/config.toml`` (``~/.config/cwm/config.toml``) if it exists.

Unknown keys in the file are reported and ignored (a file written for a newer cwm still
works); a value of the wrong type is an error naming the file, the key and what was
expected. ``cwm config show`` prints the effective configuration with the source of every
value, secrets redacted.

- `table`: every setting (key, environment variable, flag, default, check);
- `values`: the checks of values;
- `loading`: resolving them into one `Effective` configuration;
- `rendering`: what `cwm config show` prints, secrets redacted;
- `serve`, `client`: the settings as the manager and the client commands take them.

(The manager's own configuration objects, which these settings fill, are
`cwm_server.manager.config`.)
"""
