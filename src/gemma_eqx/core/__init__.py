"""The ground every other layer stands on, importing nothing else of the package: the
architecture config (`config`), input checks (`checks`), writes never seen half done
(`atomic`), the process runtime (`runtime`: CPU flags, progress bars, compilation cache;
`multihost`: joining and launching a cluster) and the tokenizer protocol (`text`)."""
