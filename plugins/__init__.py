"""Built-in plugins of robustbench_kd (installed as ``robustbench_kd_plugins``).

One module per method, plus the teacher sources, students, datasets and the default attack.
They are registered from ``robustbench_kd.plugin_host.BUILTIN_PLUGINS``, never on import.
"""
