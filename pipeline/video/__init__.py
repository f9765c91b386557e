"""The built-in video synthesis: a Coze workflow output in, an MP4 (and optionally a JianYing
draft) out.

One task goes through these rooms, in order:

- :mod:`.adapters` turns the workflow output (whatever its shape) into a :class:`.timeline.Timeline`;
- :mod:`.assets` downloads every URL the timeline names (aiohttp, size and time limits, the
  classifier's retry rules);
- :mod:`.media` runs ffmpeg: it probes durations and normalises images;
- :mod:`.timeline` (:func:`~.timeline.plan`) lays the scenes out on the clock, narration first;
- :mod:`.subtitles` writes SRT and ASS files, :mod:`.fonts` finds a font with every glyph;
- :mod:`.render` builds the ffmpeg command and runs it, killed alone on timeout;
- :mod:`.jianying` builds a JianYing draft (opt-in);
- :mod:`.job` ties them together for :class:`pipeline.synthesis.Synthesizer`.

Failures are :class:`.errors.VideoError` (a :class:`pipeline.errors.SynthesisError`); the
``code`` says which class of failure it was (``asset_not_found``, ``font_missing`` …).
"""
