"""What every adapter over a frozen ``nn.Linear`` (``self.base``) shares."""


class WrapsLinear:
    """``in_features``/``out_features`` of the wrapped ``self.base``."""

    @property
    def in_features(self) -> int:
        return self.base.in_features

    @property
    def out_features(self) -> int:
        return self.base.out_features
