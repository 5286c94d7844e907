"""The segmentation VAE and its losses.

An encoder of downsampling blocks (strided conv, batch norm, ReLU) maps an image to features at
1/2^depth resolution; a bottleneck predicts a spatial Gaussian posterior q(z|x) = N(mu, sigma^2)
and samples z with the reparameterization trick; a decoder of upsampling blocks (transposed
conv, batch norm, ReLU) decodes z into one logit map per class. With `skip=True` the decoder also
receives the encoder features of each scale, as in U-Net (Ronneberger et al. 2015).

    from model import SegVAE, VAEConfig
    logits, mu, logvar = SegVAE(VAEConfig(num_classes=11))(images)  # images (B, 3, H, W)
"""

from dataclasses import asdict, dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass
class VAEConfig:
    in_channels: int = 3
    num_classes: int = 11
    widths: tuple = (32, 64, 128, 256)  # one per downsampling block; depth = len(widths)
    latent_channels: int = 32  # channels of the spatial latent at 1/2^depth resolution
    skip: bool = True  # U-Net skip connections from encoder to decoder
    context: bool = True  # dilated residual convs at the bottleneck for wider context
    stochastic: bool = True  # False: z = mu always (the deterministic ablation, beta = 0)
    extra: dict = field(default_factory=dict)  # room for future options without breaking loads

    def to_dict(self):
        d = asdict(self)
        d["widths"] = list(self.widths)
        return d

    @classmethod
    def from_dict(cls, d):
        known = {k: v for k, v in d.items() if k in cls.__dataclass_fields__}
        unknown = sorted(set(d) - set(known))
        if unknown:
            raise ValueError(f"unknown model config keys {unknown}")
        known["widths"] = tuple(known.get("widths", cls.widths))
        return cls(**known)


def conv_bn_relu(cin, cout, stride=1, dilation=1):
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, stride=stride, padding=dilation, dilation=dilation, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(inplace=True),
    )


class Down(nn.Module):
    """Strided conv + BN + ReLU halves the resolution, then a residual 3x3 conv refines it.
    The strided conv is 2x2 so that output pixel i sits at the centre of input pixels 2i, 2i+1,
    the same grid that ConvTranspose2d(2, stride=2) and bilinear upsampling assume; a 3x3
    stride-2 conv would centre it on 2i and shift the mask by about a pixel after the decoder."""

    def __init__(self, cin, cout):
        super().__init__()
        self.down = nn.Sequential(nn.Conv2d(cin, cout, 2, stride=2, bias=False), nn.BatchNorm2d(cout),
                                  nn.ReLU(inplace=True))
        self.conv = nn.Sequential(nn.Conv2d(cout, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        x = self.down(x)
        return F.relu(x + self.conv(x))


class Up(nn.Module):
    """Transposed conv + BN + ReLU doubles the resolution; a 3x3 conv fuses the skip, if any."""

    def __init__(self, cin, cout, skip_channels):
        super().__init__()
        self.up = nn.Sequential(
            nn.ConvTranspose2d(cin, cout, 2, stride=2, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)
        )
        self.conv = conv_bn_relu(cout + skip_channels, cout)

    def forward(self, x, skip=None):
        x = self.up(x)
        if skip is not None:
            x = torch.cat([x, skip], dim=1)
        return self.conv(x)


class Context(nn.Module):
    """Two residual dilated 3x3 convs (dilation 2 and 4): a wider view at the bottleneck for
    little compute, as in the context modules of Yu & Koltun 2016."""

    def __init__(self, c):
        super().__init__()
        self.a = conv_bn_relu(c, c, dilation=2)
        self.b = conv_bn_relu(c, c, dilation=4)

    def forward(self, x):
        x = x + self.a(x)
        return x + self.b(x)


class SegVAE(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.config = config
        w = list(config.widths)
        self.downs = nn.ModuleList(Down(cin, cout) for cin, cout in zip([config.in_channels] + w[:-1], w))
        self.context = Context(w[-1]) if config.context else nn.Identity()
        self.to_stats = nn.Conv2d(w[-1], 2 * config.latent_channels, 1)  # -> mu, logvar
        self.from_latent = conv_bn_relu(config.latent_channels, w[-1])
        # Up blocks go from scale 1/2^(k+1) to 1/2^k, k = depth-1 .. 1; the head works at 1/2.
        self.ups = nn.ModuleList(
            Up(w[k], w[k - 1], w[k - 1] if config.skip else 0) for k in range(len(w) - 1, 0, -1)
        )
        self.head = nn.Conv2d(w[0], config.num_classes, 1)

    @property
    def stride(self):
        return 2 ** len(self.config.widths)

    def encode(self, x):
        """x (B, C_in, H, W), H and W multiples of `stride` -> mu, logvar (B, z, H/s, W/s), skips."""
        skips = []
        for down in self.downs:
            x = down(x)
            skips.append(x)
        h = self.context(skips.pop())
        mu, logvar = self.to_stats(h).chunk(2, dim=1)  # (B, z, H/s, W/s) each
        return mu, logvar.clamp(-12.0, 8.0), skips

    def reparameterize(self, mu, logvar, generator=None):
        """z = mu + sigma * eps, eps ~ N(0, I) (Kingma & Welling 2014, sec. 2.4)."""
        eps = torch.randn(mu.shape, generator=generator, device=mu.device, dtype=mu.dtype)
        return mu + torch.exp(0.5 * logvar) * eps

    def decode(self, z, skips, out_size):
        """z (B, z, H/s, W/s) -> logits (B, num_classes, *out_size)."""
        h = self.from_latent(z)
        for up, skip in zip(self.ups, reversed(skips)):
            h = up(h, skip if self.config.skip else None)
        logits = self.head(h)  # (B, classes, H/2, W/2)
        return F.interpolate(logits, size=out_size, mode="bilinear", align_corners=False)

    def _pad(self, x):
        """Reflect-pad H and W up to multiples of the network stride, so any size works."""
        h, w = x.shape[-2:]
        ph, pw = (-h) % self.stride, (-w) % self.stride
        if ph or pw:
            x = F.pad(x, (0, pw, 0, ph), mode="replicate")
        return x, (h, w)

    def forward(self, x, sample=None):
        """Returns logits (B, classes, H, W), mu, logvar. Samples z in training mode (or when
        `sample=True`), otherwise decodes the posterior mean."""
        x, (h, w) = self._pad(x)
        mu, logvar, skips = self.encode(x)
        sample = self.training if sample is None else sample
        z = self.reparameterize(mu, logvar) if sample and self.config.stochastic else mu
        logits = self.decode(z, skips, x.shape[-2:])
        return logits[..., :h, :w], mu, logvar

    @torch.no_grad()
    def sample(self, x, n, generator=None, latent_scale=1.0):
        """n latent samples per image, decoded in one batch: logits (n, B, classes, H, W).
        n = 1 decodes the posterior mean. `latent_scale` multiplies sigma (a calibration knob)."""
        x, (h, w) = self._pad(x)
        mu, logvar, skips = self.encode(x)
        b = mu.shape[0]
        if n == 1 or not self.config.stochastic:
            z = mu.expand(n, *mu.shape)
        else:
            std = torch.exp(0.5 * logvar) * latent_scale
            eps = torch.randn((n, *mu.shape), generator=generator, device=mu.device, dtype=mu.dtype)
            z = mu + std * eps  # (n, B, z, h', w')
        rep = [s.expand(n, *s.shape).reshape(n * b, *s.shape[1:]) for s in skips]
        logits = self.decode(z.reshape(n * b, *mu.shape[1:]), rep, x.shape[-2:])
        return logits.view(n, b, *logits.shape[1:])[..., :h, :w]


# ---------------------------------------------------------------------------------------------
# losses (pure functions)


def kl_per_channel(mu, logvar):
    """KL(N(mu, sigma^2) || N(0, 1)) per latent element, averaged over batch and positions:
    shape (z,). Closed form from Kingma & Welling 2014, appendix B:
    -1/2 (1 + log sigma^2 - mu^2 - sigma^2). Computed in float32 whatever the autocast dtype."""
    mu, logvar = mu.float(), logvar.float()
    kl = 0.5 * (mu.pow(2) + logvar.exp() - 1.0 - logvar)  # (B, z, h, w)
    return kl.mean(dim=(0, 2, 3))


def kl_loss(mu, logvar, image_pixels, free_bits=0.0):
    """The KL term in nats per image pixel, so that with the cross-entropy (nats per pixel) a
    weight of 1 gives the ELBO. `free_bits` (nats per latent element) stops the optimizer from
    pushing a channel's KL below that floor (Kingma et al. 2016, "free bits")."""
    per_channel = kl_per_channel(mu, logvar)
    if free_bits > 0:
        per_channel = per_channel.clamp_min(free_bits)
    latent_positions = mu.shape[-1] * mu.shape[-2]
    return per_channel.sum() * latent_positions / image_pixels


def segmentation_loss(logits, target, kind, ignore_index, class_weights=None):
    """Per-pixel loss over non-void pixels. logits (B, C, H, W); target (B, H, W) int64.
    "ce": cross-entropy; "mse": squared error between softmax probabilities and the one-hot
    mask, summed over classes (the Brier score, Brier 1950), averaged over valid pixels.
    class_weights (C,) reweights each pixel by its true class (normalized weighted mean)."""
    logits = logits.float()
    if kind == "ce":
        return F.cross_entropy(logits, target, weight=class_weights, ignore_index=ignore_index)
    if kind != "mse":
        raise ValueError(f"unknown loss {kind!r}")
    valid = target != ignore_index  # (B, H, W)
    safe = torch.where(valid, target, 0)
    probs = logits.softmax(dim=1)
    onehot = F.one_hot(safe, logits.shape[1]).permute(0, 3, 1, 2).to(probs.dtype)  # (B, C, H, W)
    per_pixel = (probs - onehot).pow(2).sum(dim=1)  # (B, H, W)
    w = valid.float() if class_weights is None else class_weights[safe] * valid
    return (per_pixel * w).sum() / w.sum().clamp_min(1e-8)


def active_channels(mu_var, threshold=0.01):
    """Number of latent channels whose posterior mean varies across inputs by more than
    `threshold` (the activity measure of Burda et al. 2016). mu_var: (z,) variances of mu."""
    return int((mu_var > threshold).sum())


def count_parameters(model):
    return sum(p.numel() for p in model.parameters())
