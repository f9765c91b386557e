"""The fake Feishu server now ships in the package (``opsbot demo`` uses it): re-exported here so
tests keep importing ``tests.fake_feishu``."""
from bot.standins.fake_feishu import *  # noqa: F401,F403
from bot.standins.fake_feishu import (ROUTES, TOKEN_PATH, FakeFeishu, Scripted, _matches,  # noqa: F401
                             _plain, _readback)
