"""discord.py extensions that ship with listening-core.

- :mod:`listening_core.ext.recorder`: the recording commands (``record``, ``pause``, ``resume``,
  ``stop``, ``plugins``) as a Cog: ``await bot.load_extension("listening_core.ext.recorder")``.
"""
