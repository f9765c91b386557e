"""Chat: the command parser, the handlers that answer commands and buttons, cards, i18n texts, markdown escaping, @-addressing and the bot's identity."""
