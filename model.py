"""The segmentation VAE and its losses.

An encoder of downsampling blocks (strided conv, batch norm, ReLU) maps an image to features at
1/2^depth resolution; a decoder of upsampling blocks (transposed conv, batch norm, ReLU) turns
them into one logit map per class. With `skip=True` the decoder also receives the encoder
features of each scale, as in U-Net (Ronneberger et al. 2015). Two priors:

- `prior="standard"`: the bottleneck predicts a spatial Gaussian q(z|x) = N(mu, sigma^2), the
  decoder sees only a sample z of it, and the KL is taken against N(0, I) (Kingma & Welling 2014).
- `prior="learned"`: the conditional VAE of the Probabilistic U-Net (Kohl et al. 2018). The
  decoder is a complete U-Net; a prior net p(z|x) sees the image, a posterior net q(z|x, y) sees
  the image and the true mask, and a low-dimensional z (a global vector, a spatial map, or both)
  enters the decoder at its head (broadcast, concatenated with the last decoder features, then
  1x1 convs) or at the bottleneck. Training decodes z ~ q and penalizes KL(q || p); test time
  decodes z ~ p.

    from model import SegVAE, VAEConfig
    logits, mu, logvar = SegVAE(VAEConfig(num_classes=11))(images)  # images (B, 3, H, W)
    model = SegVAE(VAEConfig(num_classes=16, prior="learned"))
    logits, mu_q, logvar_q, mu_p, logvar_p = model(images, masks)  # masks (B, H, W), training
    samples = model.sample(images, 16)  # (16, B, classes, H, W), z from the prior
"""

from dataclasses import asdict, dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

PRIORS = ("standard", "learned")
LATENT_FORMS = ("global", "spatial", "both")
INJECTIONS = ("head", "bottleneck")


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
    # The fields below were added with the learned prior; configs saved before them load with
    # the defaults, which rebuild the standard-prior model exactly. None resolves per prior.
    prior: str = "standard"  # "standard": N(0, I); "learned": p(z|x) and q(z|x, y), Kohl et al. 2018
    latent_form: str = None  # "global" vector, "spatial" map, or "both" (standard: spatial only)
    latent_dim: int = 6  # dims of the global latent vector (Kohl et al. 2018 use 6)
    inject: str = None  # where z enters the decoder: "head" or "bottleneck" (standard: bottleneck only)
    head_convs: int = None  # hidden 1x1 convs before the class logits (Kohl et al. 2018: 3; here 1)
    input_norm: bool = False  # standardize each image by its own per-channel mean and std first
    image_context: bool = False  # add the whole image's pooled bottleneck features at every position
    blocks: int = 1  # residual 3x3 convs after each strided conv of the encoder

    def __post_init__(self):
        learned = self.prior == "learned"
        if self.prior not in PRIORS:
            raise ValueError(f"prior {self.prior!r} is not one of {PRIORS}")
        if self.latent_form is None:
            self.latent_form = "global" if learned else "spatial"
        if self.inject is None:
            self.inject = "head" if learned else "bottleneck"
        if self.head_convs is None:
            # Kohl et al. 2018 put three 1x1 conv + ReLU layers between z and the logits. In
            # short CPU runs that depth let the decoder ignore z: the prior's samples all showed
            # one mode in 4 of 8 seeds of a two-mode toy (0 of 8 with one layer, 0 of 8 with
            # none), and on CamVid with flips (96x128, 100 s of training) D2_GED at 16 samples
            # was 0.54 with three layers against 0.28 with one (mode distance 0.83 against 0.56).
            self.head_convs = 1 if learned else 0
        if self.latent_form not in LATENT_FORMS:
            raise ValueError(f"latent_form {self.latent_form!r} is not one of {LATENT_FORMS}")
        if self.inject not in INJECTIONS:
            raise ValueError(f"inject {self.inject!r} is not one of {INJECTIONS}")
        if not learned and (self.latent_form, self.inject) != ("spatial", "bottleneck"):
            # The unit-Gaussian prior's latent is the bottleneck itself: a global vector or a
            # latent at the head would leave it with no image information to carry.
            raise ValueError(f"prior 'standard' has a spatial latent at the bottleneck, not "
                             f"latent_form={self.latent_form!r}, inject={self.inject!r}; use prior='learned'")
        if self.image_context and not self.context:
            raise ValueError("image_context is part of the context module: it needs context=True")
        if self.blocks < 1:
            raise ValueError(f"blocks {self.blocks} must be >= 1")
        if self.head_convs < 0 or self.latent_dim < 1 or self.latent_channels < 1:
            raise ValueError(f"head_convs {self.head_convs} must be >= 0, latent_dim {self.latent_dim} and "
                             f"latent_channels {self.latent_channels} >= 1")

    @property
    def global_dims(self):
        """Size of the global latent vector (0 when there is none)."""
        return self.latent_dim if self.latent_form in ("global", "both") else 0

    @property
    def spatial_channels(self):
        """Channels of the spatial latent map (0 when there is none)."""
        return self.latent_channels if self.latent_form in ("spatial", "both") else 0

    @property
    def latent_width(self):
        """Entries of the per-channel latent diagnostics (`latent_channel_kl`, activity): the
        latent channels (standard), or the global dims and spatial channels (learned)."""
        return self.global_dims + self.spatial_channels if self.prior == "learned" else self.latent_channels

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


def standardize(x, eps=1e-5):
    """Each image of x (B, C, H, W) to zero mean and unit std per channel, in float32: what is
    left is where a scene is lighter or darker than itself, not how light it is overall."""
    xf = x.float()
    var, mean = torch.var_mean(xf, dim=(2, 3), keepdim=True)
    return ((xf - mean) * torch.rsqrt(var + eps)).to(x.dtype)


def conv_bn_relu(cin, cout, stride=1, dilation=1):
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, stride=stride, padding=dilation, dilation=dilation, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(inplace=True),
    )


class Down(nn.Module):
    """Strided conv + BN + ReLU halves the resolution, then `blocks` residual 3x3 convs refine it.
    The strided conv is 2x2 so that output pixel i sits at the centre of input pixels 2i, 2i+1,
    the same grid that ConvTranspose2d(2, stride=2) and bilinear upsampling assume; a 3x3
    stride-2 conv would centre it on 2i and shift the mask by about a pixel after the decoder."""

    def __init__(self, cin, cout, blocks=1):
        super().__init__()
        self.down = nn.Sequential(nn.Conv2d(cin, cout, 2, stride=2, bias=False), nn.BatchNorm2d(cout),
                                  nn.ReLU(inplace=True))
        # The first residual conv keeps its name, so checkpoints saved before `blocks` load as they were.
        self.conv = residual_conv(cout)
        self.more = nn.ModuleList(residual_conv(cout) for _ in range(blocks - 1))

    def forward(self, x):
        x = self.down(x)
        for conv in (self.conv, *self.more):
            x = F.relu(x + conv(x))
        return x


def residual_conv(c):
    """The residual branch of a Down block: 3x3 conv + BN, added to its input before the ReLU."""
    return nn.Sequential(nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c))


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
    little compute, as in the context modules of Yu & Koltun 2016. With `image`, first a
    residual image-level feature, the bottleneck averaged over the whole image through a 1x1
    conv (the image pooling of PSPNet and DeepLab v3), so every position sees the scene."""

    def __init__(self, c, image=False):
        super().__init__()
        self.image = nn.Sequential(nn.Conv2d(c, c, 1), nn.ReLU(inplace=True)) if image else None
        self.a = conv_bn_relu(c, c, dilation=2)
        self.b = conv_bn_relu(c, c, dilation=4)

    def forward(self, x):
        if self.image is not None:
            x = x + self.image(x.mean((2, 3), keepdim=True))
        x = x + self.a(x)
        return x + self.b(x)


# Log-variance range of the learned prior and posterior: sigma in [e^-5, e^3]. exp() of anything
# in it is finite in bfloat16 and float32, and the KL's 1/sigma_p^2 stays below e^10, so a
# runaway head cannot turn the KL into inf or NaN (a failure users of Probabilistic U-Net ports
# report). A soft clamp, so a head pushed to the edge still gets a gradient back.
LOGVAR_MIN, LOGVAR_MAX = -10.0, 6.0


def soft_clamp(x, lo, hi):
    """Smooth clamp to (lo, hi): about x well inside, never exactly flat (softplus on both sides)."""
    x = lo + F.softplus(x - lo)
    return hi - F.softplus(hi - x)


class GaussianNet(nn.Module):
    """A diagonal Gaussian over the latent from bottleneck features (Kohl et al. 2018's prior and
    posterior nets, here sharing the segmentation encoder): a 1x1 and a 3x3 conv, then the
    global part from the mean over positions and the spatial part per position.
    Returns mu, logvar, each (B, K) with K = global_dims + spatial_channels * h' * w': the global
    dims first, then the spatial map (B, c, h', w') flattened channel-major."""

    def __init__(self, cin, mid, global_dims, spatial_channels, mask_channels=0):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(cin, mid, 1, bias=False), nn.BatchNorm2d(mid), nn.ReLU(inplace=True))
        # The mask gets its own embedding and batch norm: mixed into the image features by one
        # conv, its variation was too small beside theirs for the posterior to pick it up.
        self.mask = nn.Sequential(nn.Conv2d(mask_channels, mid, 1, bias=False), nn.BatchNorm2d(mid),
                                  nn.ReLU(inplace=True)) if mask_channels else None
        self.body = conv_bn_relu(2 * mid if mask_channels else mid, mid)
        self.to_global = nn.Conv2d(mid, 2 * global_dims, 1) if global_dims else None
        self.to_spatial = nn.Conv2d(mid, 2 * spatial_channels, 1) if spatial_channels else None
        for out in (self.to_global, self.to_spatial):
            if out is not None:  # start at N(0, I): KL(q || p) = 0 and no z is extreme at step 0
                nn.init.zeros_(out.weight)
                nn.init.zeros_(out.bias)

    def forward(self, h, mask=None):
        f = self.features(h)  # (B, mid, h', w')
        if self.mask is not None:
            f = torch.cat([f, self.mask(mask)], dim=1)  # (B, 2 mid, h', w')
        f = self.body(f)  # (B, mid, h', w')
        mus, logvars = [], []
        if self.to_global is not None:
            mu, logvar = self.to_global(f.mean((2, 3), keepdim=True)).flatten(1).chunk(2, dim=1)  # (B, d) each
            mus.append(mu)
            logvars.append(logvar)
        if self.to_spatial is not None:
            mu, logvar = self.to_spatial(f).chunk(2, dim=1)  # (B, c, h', w') each
            mus.append(mu.flatten(1))
            logvars.append(logvar.flatten(1))
        mu, logvar = torch.cat(mus, 1), torch.cat(logvars, 1)  # (B, K)
        return mu, soft_clamp(logvar, LOGVAR_MIN, LOGVAR_MAX)


def class_head(cin, width, num_classes, hidden):
    """1x1 conv to the class logits, after `hidden` 1x1 conv + ReLU layers of `width` channels
    (the Probabilistic U-Net's f_comb, Kohl et al. 2018: the latent joins the features here)."""
    if hidden == 0:
        return nn.Conv2d(cin, num_classes, 1)
    layers = []
    for i in range(hidden):
        layers += [nn.Conv2d(cin if i == 0 else width, width, 1), nn.ReLU(inplace=True)]
    return nn.Sequential(*layers, nn.Conv2d(width, num_classes, 1))


class SegVAE(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.config = config
        c, w = config, list(config.widths)
        self.learned = c.prior == "learned"
        z_in = c.global_dims + c.spatial_channels  # latent channels once z is laid out as a map
        self.downs = nn.ModuleList(Down(cin, cout, c.blocks) for cin, cout in zip([c.in_channels] + w[:-1], w))
        self.context = Context(w[-1], c.image_context) if c.context else nn.Identity()
        if self.learned:
            # Prior and posterior share the encoder's bottleneck features (see GaussianNet): on
            # a CPU a second and third encoder, as in Kohl et al. 2018, would about double a step.
            mid = max(w[-1] // 2, 8)
            self.prior_net = GaussianNet(w[-1], mid, c.global_dims, c.spatial_channels)
            self.posterior_net = GaussianNet(w[-1], mid, c.global_dims, c.spatial_channels, c.num_classes)
            self.from_latent = conv_bn_relu(w[-1] + (z_in if c.inject == "bottleneck" else 0), w[-1])
        else:
            self.to_stats = nn.Conv2d(w[-1], 2 * c.latent_channels, 1)  # -> mu, logvar
            self.from_latent = conv_bn_relu(c.latent_channels, w[-1])
        # Up blocks go from scale 1/2^(k+1) to 1/2^k, k = depth-1 .. 1; the head works at 1/2.
        self.ups = nn.ModuleList(
            Up(w[k], w[k - 1], w[k - 1] if c.skip else 0) for k in range(len(w) - 1, 0, -1)
        )
        head_in = w[0] + (z_in if self.learned and c.inject == "head" else 0)
        self.head = class_head(head_in, w[0], c.num_classes, c.head_convs)

    @property
    def stride(self):
        return 2 ** len(self.config.widths)

    def encode(self, x):
        """x (B, C_in, H, W), H and W multiples of `stride` -> mu, logvar, feats.
        standard: mu, logvar (B, z, H/s, W/s) of q(z|x); feats = the skips.
        learned: mu, logvar (B, K) of the prior p(z|x) (layout in GaussianNet); feats = the skips
        and, last, the bottleneck features (B, widths[-1], H/s, W/s)."""
        if self.config.input_norm:
            x = standardize(x)
        skips = []
        for down in self.downs:
            x = down(x)
            skips.append(x)
        h = self.context(skips.pop())
        if self.learned:
            mu, logvar = self.prior_net(h)
            return mu, logvar, skips + [h]
        mu, logvar = self.to_stats(h).chunk(2, dim=1)  # (B, z, H/s, W/s) each
        return mu, logvar.clamp(-12.0, 8.0), skips

    def posterior(self, feats, target):
        """Learned prior only: q(z|x, y) as mu, logvar (B, K), from the bottleneck features in
        `feats` and target (B, H, W) integer labels at the encoded size. Labels outside
        [0, num_classes) (void, padding) are no class: their one-hot is all zeros."""
        h = feats[-1]
        c = self.config.num_classes
        target = target.long()
        valid = (target >= 0) & (target < c)
        onehot = torch.zeros(target.shape[0], c, *target.shape[1:], device=h.device)  # (B, C, H, W)
        onehot.scatter_(1, torch.where(valid, target, 0)[:, None], valid[:, None].float())
        # The mask reaches the posterior as the share of each class in every bottleneck cell.
        frac = F.avg_pool2d(onehot, self.stride).to(h.dtype)  # (B, C, H/s, W/s)
        return self.posterior_net(h, frac)

    def reparameterize(self, mu, logvar, generator=None):
        """z = mu + sigma * eps, eps ~ N(0, I) (Kingma & Welling 2014, sec. 2.4)."""
        eps = torch.randn(mu.shape, generator=generator, device=mu.device, dtype=mu.dtype)
        return mu + torch.exp(0.5 * logvar) * eps

    def decode(self, z, feats, out_size):
        """z -> logits (B, num_classes, *out_size); out_size is the encoded (padded) size.
        standard: z (B, z, H/s, W/s), feats the skips; learned: z (B, K), feats from `encode`."""
        return self._head(self._trunk(z, feats), z, out_size)

    def _trunk(self, z, feats):
        """The decoder up to its last features (B, widths[0], H/2, W/2). z is used here only
        when it enters at the bottleneck (always for the standard prior)."""
        if self.learned:
            h, skips = feats[-1], feats[:-1]
            if self.config.inject == "bottleneck":
                h = torch.cat([h, self._latent_map(z, h.shape[-2:], h.shape[-2:])], dim=1)
            h = self.from_latent(h)
        else:
            h, skips = self.from_latent(z), feats
        for up, skip in zip(self.ups, reversed(skips)):
            h = up(h, skip if self.config.skip else None)
        return h

    def _head(self, h, z, out_size):
        if self.learned and self.config.inject == "head":
            h = self._with_latent(h, z, out_size)
        logits = self.head(h)  # (B, classes, H/2, W/2)
        return F.interpolate(logits, size=out_size, mode="bilinear", align_corners=False)

    def _with_latent(self, h, z, out_size):
        """The head's input: features h (B, c, H/2, W/2) and the latent z laid out beside them."""
        grid = (out_size[0] // self.stride, out_size[1] // self.stride)
        return torch.cat([h, self._latent_map(z, grid, h.shape[-2:])], dim=1)

    def _latent_map(self, z, grid, size):
        """z (B, K) -> (B, global_dims + spatial_channels, *size): the global vector broadcast to
        every position (Kohl et al. 2018), the spatial map (B, c, *grid) upsampled bilinearly."""
        dg, cs = self.config.global_dims, self.config.spatial_channels
        parts = []
        if dg:
            parts.append(z[:, :dg, None, None].expand(-1, -1, *size))  # (B, d, *size)
        if cs:
            m = z[:, dg:].reshape(z.shape[0], cs, *grid)  # (B, c, H/s, W/s)
            if tuple(grid) != tuple(size):
                m = F.interpolate(m, size=tuple(size), mode="bilinear", align_corners=False)
            parts.append(m)
        return torch.cat(parts, dim=1)

    def _pad(self, x, value=None):
        """Pad H and W up to multiples of the network stride, so any size works: images by
        replicating the border, label maps (value given) with that value."""
        h, w = x.shape[-2:]
        ph, pw = (-h) % self.stride, (-w) % self.stride
        if ph or pw:
            x = F.pad(x, (0, pw, 0, ph), mode="replicate") if value is None else F.pad(x, (0, pw, 0, ph), value=value)
        return x, (h, w)

    def forward(self, x, target=None, sample=None, prior_samples=0):
        """x (B, C_in, H, W). z is sampled in training mode (or when `sample=True`), otherwise
        the mean is decoded.

        Without target: logits (B, classes, H, W), mu, logvar, with z from q(z|x) (standard) or
        from the prior p(z|x) (learned, whose mu and logvar are then the prior's).
        With target (B, H, W) integer labels (void outside [0, classes)): logits, mu_q,
        logvar_q, mu_p, logvar_p, what `kl_loss` needs. Learned: z from the posterior q(z|x, y);
        standard: the target is not used and the prior is N(0, I) (zeros).
        prior_samples K > 0 (learned prior with z at the head, and a target): a sixth output,
        the logits of K draws from the prior p(z|x) at the head's resolution (K, B, classes,
        ceil(H/2), ceil(W/2)), which reach only the prior (see `prior_head_samples`)."""
        x, (h, w) = self._pad(x)
        mu, logvar, feats = self.encode(x)
        sample = self.training if sample is None else sample
        if target is None or not self.learned:
            z = self.reparameterize(mu, logvar) if sample and self.config.stochastic else mu
            logits = self.decode(z, feats, x.shape[-2:])[..., :h, :w]
            if target is None:
                return logits, mu, logvar
            return logits, mu, logvar, torch.zeros_like(mu), torch.zeros_like(logvar)
        if target.shape[-2:] != (h, w):
            raise ValueError(f"target of size {tuple(target.shape[-2:])} for images of size {(h, w)}")
        mu_q, logvar_q = self.posterior(feats, self._pad(target.long(), value=-1)[0])
        z = self.reparameterize(mu_q, logvar_q) if sample and self.config.stochastic else mu_q
        if not prior_samples:
            logits = self.decode(z, feats, x.shape[-2:])[..., :h, :w]
            return logits, mu_q, logvar_q, mu, logvar
        if self.config.inject != "head":
            raise ValueError("prior_samples needs the latent at the head (inject='head')")
        trunk = self._trunk(None, feats)
        logits = self._head(trunk, z, x.shape[-2:])[..., :h, :w]
        drawn = self.prior_head_samples(trunk, mu, logvar, prior_samples, x.shape[-2:])
        return logits, mu_q, logvar_q, mu, logvar, drawn[..., :(h + 1) // 2, :(w + 1) // 2]

    def prior_head_samples(self, trunk, mu, logvar, k, out_size):
        """Logits (k, B, classes, H/2, W/2) of k reparameterized draws from the prior N(mu, var),
        decoded by the head from the trunk's features (B, widths[0], H/2, W/2). The trunk and
        the head's weights are detached: a loss on these logits moves only the prior (and the
        encoder features it reads), not how the decoder maps a latent to a segmentation."""
        b = mu.shape[0]
        eps = torch.randn((k, *mu.shape), device=mu.device, dtype=mu.dtype)
        z = (mu + torch.exp(0.5 * logvar) * eps).reshape(k * b, *mu.shape[1:])
        h = self._with_latent(trunk.detach().expand(k, *trunk.shape).reshape(k * b, *trunk.shape[1:]), z, out_size)
        weights = {name: p.detach() for name, p in self.head.named_parameters()}
        logits = torch.func.functional_call(self.head, weights, (h,))
        return logits.view(k, b, *logits.shape[1:])

    def forward_val(self, x, target):
        """Validation in one encoder pass: logits (B, classes, H, W) decoded from the test-time
        latent mean (standard: q(z|x), as `forward(x)` in eval mode; learned: the prior p(z|x)),
        and mu_q, logvar_q, mu_p, logvar_p for KL(q || p): learned, q(z|x, y) of `target`
        (B, H, W); standard, q(z|x) and the unit prior (zeros)."""
        x, (h, w) = self._pad(x)
        mu, logvar, feats = self.encode(x)
        logits = self.decode(mu, feats, x.shape[-2:])[..., :h, :w]
        if not self.learned:
            return logits, mu, logvar, torch.zeros_like(mu), torch.zeros_like(logvar)
        mu_q, logvar_q = self.posterior(feats, self._pad(target.long(), value=-1)[0])
        return logits, mu_q, logvar_q, mu, logvar

    @torch.no_grad()
    def sample(self, x, n, generator=None, global_noise=None):
        """n latent samples per image, decoded in one batch: logits (n, B, classes, H, W), z from
        q(z|x) (standard) or the prior p(z|x) (learned). n = 1 decodes the mean.
        global_noise (n, B, global_dims) standard normals, optional: the draws of the learned
        prior's global latent, so that views of one image (mirrored, rescaled, its tiles) can
        decode the same samples; the spatial latent is always drawn from `generator`."""
        x, (h, w) = self._pad(x)
        mu, logvar, feats = self.encode(x)
        b = mu.shape[0]
        if n == 1 or not self.config.stochastic:
            z = mu.expand(n, *mu.shape)
        else:
            std = torch.exp(0.5 * logvar)
            eps = torch.randn((n, *mu.shape), generator=generator, device=mu.device, dtype=mu.dtype)
            if global_noise is not None and self.learned:
                eps[..., :self.config.global_dims] = global_noise.to(eps.dtype)
            z = mu + std * eps  # (n, B, *latent)
        z = z.reshape(n * b, *mu.shape[1:])

        def rep(t):  # (B, ...) -> (n * B, ...), sample-major like z
            return t.expand(n, *t.shape).reshape(n * b, *t.shape[1:])

        if self.learned and self.config.inject == "head":
            # Only the head sees z: run the U-Net once and the 1x1 head n times.
            logits = self._head(rep(self._trunk(None, feats)), z, x.shape[-2:])
        else:
            logits = self.decode(z, [rep(f) for f in feats], x.shape[-2:])
        return logits.view(n, b, *logits.shape[1:])[..., :h, :w]


# ---------------------------------------------------------------------------------------------
# losses (pure functions)


def gaussian_kl(mu_q, logvar_q, mu_p, logvar_p):
    """KL(N(mu_q, var_q) || N(mu_p, var_p)) per element, in nats, in float32 whatever the
    autocast dtype. Closed form for two univariate Gaussians (Bishop 2006, PRML, exercise 1.30),
    which sums over the dimensions of a diagonal Gaussian:
    1/2 (log var_p - log var_q + var_q / var_p + (mu_q - mu_p)^2 / var_p - 1).
    With mu_p = logvar_p = 0 it is Kingma & Welling 2014, appendix B."""
    mu_q, logvar_q, mu_p, logvar_p = (t.float() for t in (mu_q, logvar_q, mu_p, logvar_p))
    # var_q / var_p as one exp of the difference: no overflow of either variance on its own.
    return 0.5 * (logvar_p - logvar_q + (logvar_q - logvar_p).exp()
                  + (mu_q - mu_p).pow(2) * (-logvar_p).exp() - 1.0)


def kl_per_dim(mu, logvar, prior_mu=None, prior_logvar=None):
    """KL(q || p) per latent dimension, averaged over the batch (and the positions of a spatial
    latent): shape (z,) for mu (B, z, h, w), (K,) for mu (B, K). p is N(0, I) when prior_mu
    and prior_logvar are None. Float32."""
    if prior_mu is None:
        prior_mu, prior_logvar = torch.zeros((), device=mu.device), torch.zeros((), device=mu.device)
    kl = gaussian_kl(mu, logvar, prior_mu, prior_logvar)  # (B, z, h, w) or (B, K)
    return kl.mean(dim=(0, 2, 3)) if kl.dim() == 4 else kl.mean(dim=0)


def kl_per_channel(mu, logvar):
    """KL(N(mu, sigma^2) || N(0, 1)) per latent channel, averaged over batch and positions:
    shape (z,). -1/2 (1 + log sigma^2 - mu^2 - sigma^2), Kingma & Welling 2014, appendix B."""
    return kl_per_dim(mu, logvar)


def kl_loss(mu, logvar, image_pixels, free_bits=0.0, prior_mu=None, prior_logvar=None):
    """KL(q || p) in nats per image pixel, so that with the cross-entropy (nats per pixel) a
    weight of 1 gives the ELBO (Kingma & Welling 2014; Kohl et al. 2018, sec. 2, whose loss sums
    the cross-entropy over pixels). p is N(0, I) unless prior_mu, prior_logvar are given.
    `free_bits` (nats per latent element) stops the optimizer from pushing a dimension's KL
    below that floor (Kingma et al. 2016, "free bits")."""
    per_dim = kl_per_dim(mu, logvar, prior_mu, prior_logvar)
    if free_bits > 0:
        per_dim = per_dim.clamp_min(free_bits)
    latent_positions = mu.shape[-1] * mu.shape[-2] if mu.dim() == 4 else 1
    return per_dim.sum() * latent_positions / image_pixels


def latent_channel_kl(per_dim, config):
    """KL per latent channel from `kl_per_dim`'s output, the collapse diagnostic: (z,) for the
    standard prior; for the learned prior the global dims, then each spatial channel's mean
    over positions, (global_dims + spatial_channels,). A channel near 0 carries nothing."""
    if config.prior != "learned":
        return per_dim
    dg, cs = config.global_dims, config.spatial_channels
    parts = [per_dim[:dg]]
    if cs:
        parts.append(per_dim[dg:].reshape(cs, -1).mean(1))  # (c, h' * w') -> (c,)
    return torch.cat(parts)


def segmentation_loss(logits, target, kind, ignore_index, class_weights=None):
    """Per-pixel loss over non-void pixels. logits (B, C, H, W); target (B, H, W) int64.
    "ce": cross-entropy; "mse": squared error between softmax probabilities and the one-hot
    mask, summed over classes (the Brier score, Brier 1950), averaged over valid pixels.
    class_weights (C,) reweights each pixel by its true class (normalized weighted mean).
    "ce_dice": cross-entropy plus the soft Dice loss (Milletari et al. 2016), which weighs each
    class present in the batch alike however few its pixels (thin and rare classes)."""
    logits = logits.float()
    if kind == "ce":
        return F.cross_entropy(logits, target, weight=class_weights, ignore_index=ignore_index)
    if kind == "ce_dice":  # one log-softmax for both terms
        log_probs = logits.log_softmax(dim=1)
        ce = F.nll_loss(log_probs, target, weight=class_weights, ignore_index=ignore_index)
        return ce + soft_dice_loss(log_probs, target, ignore_index, log_probs=True)
    if kind != "mse":
        raise ValueError(f"unknown loss {kind!r}")
    valid = target != ignore_index  # (B, H, W)
    safe = torch.where(valid, target, 0)
    probs = logits.softmax(dim=1)
    onehot = F.one_hot(safe, logits.shape[1]).permute(0, 3, 1, 2).to(probs.dtype)  # (B, C, H, W)
    per_pixel = (probs - onehot).pow(2).sum(dim=1)  # (B, H, W)
    w = valid.float() if class_weights is None else class_weights[safe] * valid
    return (per_pixel * w).sum() / w.sum().clamp_min(1e-8)


def fair_brier_loss(sample_logits, target, ignore_index):
    """The Brier score of the samples' mean class distribution, estimated without bias from K >= 2
    samples (the "fair" Brier score, Ferro 2014), averaged over the labelled pixels.
    sample_logits (K, B, C, H, W), target (B, H, W). Per pixel, with p_k the softmax of sample k
    and y the one-hot label: mean_k |p_k - y|^2 - 1/(2 K (K-1)) sum_{k != l} |p_k - p_l|^2, whose
    expectation is |E p - y|^2. Its minimum over the samples' distribution is where each class's
    sampled frequency equals its frequency in the labels, however sharp each sample is."""
    k = sample_logits.shape[0]
    if k < 2:
        raise ValueError("fair_brier_loss needs at least 2 samples")
    p = sample_logits.float().softmax(dim=2)  # (K, B, C, H, W)
    valid = (target != ignore_index) & (target >= 0) & (target < p.shape[2])  # (B, H, W)
    y = torch.where(valid, target, 0).long()
    sq = p.pow(2).sum(2)  # (K, B, H, W): |p_k|^2
    at_y = p.gather(2, y.expand(k, *y.shape)[:, :, None]).squeeze(2)  # (K, B, H, W): p_k[y]
    total = p.sum(0)  # (B, C, H, W)
    spread = (2 * k * sq.sum(0) - 2 * total.pow(2).sum(1)) / (2 * k * (k - 1))  # (B, H, W)
    score = (sq - 2 * at_y + 1).mean(0) - spread
    return (score * valid).sum() / valid.sum().clamp_min(1)


def soft_dice_loss(logits, target, ignore_index, log_probs=False):
    """1 - the mean over the classes present in the batch's masks of the soft Dice score
    2 sum(p y) / (sum(p) + sum(y)) over the batch's non-void pixels. logits (B, C, H, W) float
    (log-probabilities already with `log_probs`); target (B, H, W) int64. Reads the
    probabilities at the true class by a gather, no one-hot."""
    c = logits.shape[1]
    valid = target != ignore_index
    probs = logits.exp() if log_probs else logits.softmax(dim=1)
    truth = target[valid]
    at_truth = probs.permute(0, 2, 3, 1)[valid].gather(1, truth[:, None])[:, 0]  # (n,)
    overlap = torch.zeros(c, device=logits.device).index_add_(0, truth, at_truth)
    true_pixels = torch.bincount(truth, minlength=c).to(probs.dtype)
    predicted = (probs * valid[:, None]).sum((0, 2, 3))
    present = true_pixels > 0
    if not present.any():
        return logits.sum() * 0
    dice = 2 * overlap[present] / (predicted[present] + true_pixels[present])
    return 1 - dice.mean()


def active_channels(mu_var, threshold=0.01):
    """Number of latent channels whose posterior mean varies across inputs by more than
    `threshold` (the activity measure of Burda et al. 2016). mu_var: (z,) variances of mu."""
    return int((mu_var > threshold).sum())


def count_parameters(model):
    return sum(p.numel() for p in model.parameters())
