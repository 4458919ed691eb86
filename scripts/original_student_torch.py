"""A PyTorch re-statement of the original LEADER student training loop (LEADER-pytorch's
`main_medrec.py` with `models/LEADER.py`, `models/bert_models.py`, `models/utils.py`,
`generators/data.py:MedRecEHRDataset`, `trainers/medrec_trainer.py`), used by
`scripts/bench_student.py --train` as the speed reference.

Kept as the original does it (these are what make it slow, and what the JAX student replaces):
- per-sample Python batching: each `__getitem__` deep-copies the record, pads every code set with
  '[PAD]' tokens to `max_seq_length` (100) and the visit list to `max_record_num` (10), maps tokens to ids
  through dicts, and the default `DataLoader` collate stacks the samples (batch 4, shuffled);
- one embedding table over the merged vocabulary ([PAD], [CLS], [MASK], drugs, diagnoses, procedures);
- three code-set transformer blocks over [B, 10, 100] sets (padding included), one visit block shared
  by the three streams (the drug stream shifted by one visit, the profile prompt in its first slot),
  masked means, the profile encoder (one embedding per field → Linear; its diagnosis head also feeds
  the drug stream, as in the original), head ReLU → Linear(3d, 2d) → ReLU → Linear(2d, n_med);
- loss = BCE (mean over drugs) + w·alignment (the original contrastive loss, positive excluded from the
  denominator, with projections), mean over the batch; Adam, one step per batch; `.item()` per step.
Only the no-KD configuration is restated (the bench compares training speed; KD adds one projection).
"""
from __future__ import annotations

import copy
import math

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

SPECIAL = ("[PAD]", "[CLS]", "[MASK]")


def gelu(x):
    return 0.5 * x * (1 + torch.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * torch.pow(x, 3))))


class LayerNorm(nn.Module):
    def __init__(self, d, eps=1e-12):
        super().__init__()
        self.weight, self.bias, self.eps = nn.Parameter(torch.ones(d)), nn.Parameter(torch.zeros(d)), eps

    def forward(self, x):
        u = x.mean(-1, keepdim=True)
        s = (x - u).pow(2).mean(-1, keepdim=True)
        return self.weight * (x - u) / torch.sqrt(s + self.eps) + self.bias


class MultiHeadedAttention(nn.Module):
    def __init__(self, d, h, attn_drop):
        super().__init__()
        self.d_k, self.h = d // h, h
        self.linear_layers = nn.ModuleList([nn.Linear(d, d, bias=False) for _ in range(3)])
        self.output_linear = nn.Linear(d, d)
        self.dropout = nn.Dropout(attn_drop)

    def forward(self, x, mask):
        b = x.size(0)
        if x.dim() == 3:
            q, k, v = [l(x).view(b, -1, self.h, self.d_k).transpose(1, 2) for l in self.linear_layers]
        else:
            s2, s3 = x.size(1), x.size(2)
            q, k, v = [l(x).view(b, s2, s3, self.h, self.d_k).transpose(-2, -3) for l in self.linear_layers]
        scores = torch.matmul(q, k.transpose(-2, -1)) / math.sqrt(q.size(-1))
        scores = scores.masked_fill(mask == 0, -1e9)
        out = torch.matmul(self.dropout(F.softmax(scores, dim=-1)), v)
        if q.dim() == 4:
            out = out.transpose(1, 2).contiguous().view(b, -1, self.h * self.d_k)
        else:
            out = out.transpose(-2, -3).contiguous().view(b, s2, s3, self.h * self.d_k)
        return self.output_linear(out)


class TransformerBlock(nn.Module):
    def __init__(self, d=64, h=4, ffn=300, drop=0.4, attn_drop=0.1):
        super().__init__()
        self.attention = MultiHeadedAttention(d, h, attn_drop)
        self.w_1, self.w_2 = nn.Linear(d, ffn), nn.Linear(ffn, d)
        self.norm1, self.norm2 = LayerNorm(d), LayerNorm(d)
        self.drop1, self.drop2, self.drop_ffn, self.drop = (nn.Dropout(drop) for _ in range(4))

    def forward(self, x, mask):
        x = x + self.drop1(self.attention(self.norm1(x), mask))
        x = x + self.drop2(self.w_2(self.drop_ffn(gelu(self.w_1(self.norm2(x))))))
        return self.drop(x)


class ContrastiveLoss(nn.Module):
    def __init__(self, d, tau=1.0):
        super().__init__()
        self.x_projector, self.y_projector, self.tau = nn.Linear(d, d), nn.Linear(d, d), tau

    def compute_cl(self, x, y):
        sim = F.cosine_similarity(x.unsqueeze(1), y.unsqueeze(0), dim=2)
        pos = torch.exp(torch.diag(sim) / self.tau).unsqueeze(0)
        neg = torch.sum(torch.exp(sim / self.tau), dim=0) - pos
        return (-torch.log(pos / neg)).view(x.shape[0], -1)

    def forward(self, x, y):
        x, y = self.x_projector(x), self.y_projector(y)
        return self.compute_cl(x, y) + self.compute_cl(y, x)


class LeaderStudent(nn.Module):
    def __init__(self, vocab_size, n_med, profile_sizes, d=64, align_weight=0.005):
        super().__init__()
        self.embeddings = nn.Embedding(vocab_size, d)
        self.profile_encoder = nn.ModuleList([nn.Embedding(n, d) for n in profile_sizes])
        self.diag_head = nn.Linear(len(profile_sizes) * d, d)
        self.proc_head = nn.Linear(len(profile_sizes) * d, d)
        self.med_trm, self.diag_trm, self.proc_trm, self.visit_trm = (TransformerBlock(d) for _ in range(4))
        self.medrec = nn.Sequential(nn.ReLU(), nn.Linear(3 * d, 2 * d), nn.ReLU(), nn.Linear(2 * d, n_med))
        self.loss_fct = nn.BCEWithLogitsLoss(reduction="none")
        self.align = ContrastiveLoss(d)
        self.align_weight = align_weight

    def encode_sets(self, trm, seq):
        length = torch.sum(seq > 0, dim=2).unsqueeze(-1)
        length[length == 0] = 1
        mask = (seq > 0).unsqueeze(2).repeat(1, 1, seq.shape[2], 1).unsqueeze(2)
        x = trm(self.embeddings(seq), mask)
        return torch.sum(x * (seq > 0).unsqueeze(-1), dim=2) / length

    def forward(self, diag_seq, proc_seq, med_seq, seq_mask, labels, multi_label, profile):
        dx, px, md = (self.encode_sets(t, s) for t, s in ((self.diag_trm, diag_seq), (self.proc_trm, proc_seq),
                                                           (self.med_trm, med_seq)))
        prof = torch.cat([emb(profile[:, i]) for i, emb in enumerate(self.profile_encoder)], dim=-1)
        med_pp = self.diag_head(prof).view(prof.shape[0], 1, -1)     # the original feeds diag_head here
        md = torch.cat([med_pp, md], dim=1)[:, :-1, :]
        vmask = seq_mask.unsqueeze(1).repeat(1, seq_mask.shape[1], 1).unsqueeze(1)
        dx, px, md = (self.visit_trm(x, vmask) for x in (dx, px, md))
        n = torch.sum(seq_mask, dim=1).unsqueeze(1)
        pooled = [torch.sum(x * seq_mask.unsqueeze(-1), dim=1) / n for x in (dx, px, md)]
        output = self.medrec(torch.cat(pooled, dim=1))
        if not self.training:
            return output
        loss = self.loss_fct(output, labels).mean(dim=-1)
        target = multi_label.unsqueeze(1).clone()
        target[target < 0] = 0
        align = self.align(self.encode_sets(self.med_trm, target).squeeze(), med_pp.view(prof.shape[0], -1))
        return (loss + self.align_weight * align.mean(dim=-1)).mean()


class MedRecDataset(torch.utils.data.Dataset):
    """The original's per-sample batching over prepared `Sample`s (token strings)."""

    def __init__(self, samples, vocab, max_seq_length=100, max_record_num=10):
        self.records = [{"records": {"diagnosis": [list(v.diagnoses) for v in s.visits],
                                     "procedure": [list(v.procedures) for v in s.visits],
                                     "medication": [list(v.medications) for v in s.visits]},
                         "profile": {f: s.profile.get(f, "unknown") for f in vocab.profile}} for s in samples]
        self.word2idx = {t: i for i, t in enumerate(SPECIAL + tuple(vocab.med) + tuple(vocab.diag) + tuple(vocab.proc))}
        self.med2idx = {t: i for i, t in enumerate(vocab.med)}
        self.profile2idx = {f: {v: i for i, v in enumerate(vals)} for f, vals in vocab.profile.items()}
        self.seq_len, self.max_seq = max_seq_length, max_record_num

    def __len__(self):
        return len(self.records)

    def __getitem__(self, item):
        adm = copy.deepcopy(self.records[item])
        med_seq, diag_seq, proc_seq = (adm["records"][k] for k in ("medication", "diagnosis", "procedure"))
        profile = [self.profile2idx[k].get(v, 0) for k, v in adm["profile"].items()]
        label = np.zeros(len(self.med2idx))
        multi_label = np.full(len(self.med2idx), -1)
        for i, index in enumerate(self.med2idx[t] for t in med_seq[-1]):
            label[index] = 1
            multi_label[i] = index      # a drug-vocabulary index, embedded with the merged table (as the original)

        def fill_to_max(seq):
            seq = seq[: self.seq_len]
            while len(seq) < self.seq_len:
                seq.append("[PAD]")
            return [self.word2idx[t] for t in seq]

        med_seq, diag_seq, proc_seq = ([fill_to_max(s) for s in seqs] for seqs in (med_seq, diag_seq, proc_seq))
        pad = [0] * self.seq_len

        def fill_to_max_seq(seqs):
            n_pad = 0
            while len(seqs) < self.max_seq:
                seqs.append(pad)
                n_pad += 1
            return seqs[: self.max_seq], n_pad

        med_seq, _ = fill_to_max_seq(med_seq[:-1])
        diag_seq, n_pad = fill_to_max_seq(diag_seq)
        proc_seq, _ = fill_to_max_seq(proc_seq)
        mask = np.ones(self.max_seq)
        if n_pad:
            mask[-n_pad:] = 0
        return (np.array(diag_seq, dtype=int), np.array(proc_seq, dtype=int), np.array(med_seq, dtype=int),
                mask.astype(int), label.astype(float), multi_label.astype(int), np.array(profile, dtype=int))


NAMES = ("diag_seq", "proc_seq", "med_seq", "seq_mask", "labels", "multi_label", "profile")


class OriginalTrainer:
    """Model, Adam and loaders as the original builds them; `epoch()` = one training pass (one Adam step
    per batch, `.item()` per step) plus one evaluation pass over `val` (sigmoid outputs to numpy)."""

    def __init__(self, train_samples, val_samples, vocab, batch_size=4, lr=5e-4, seed=42):
        torch.manual_seed(seed)
        self.train_set, self.val_set = MedRecDataset(train_samples, vocab), MedRecDataset(val_samples, vocab)
        self.model = LeaderStudent(len(self.train_set.word2idx), len(vocab.med),
                                   [len(v) for v in vocab.profile.values()])
        self.opt = torch.optim.Adam(self.model.parameters(), lr=lr)
        self.train_loader = torch.utils.data.DataLoader(self.train_set, batch_size=batch_size, shuffle=True)
        self.val_loader = torch.utils.data.DataLoader(self.val_set, batch_size=batch_size, shuffle=False)

    def train_steps(self, max_steps=None) -> int:
        self.model.train()
        steps = 0
        for batch in self.train_loader:
            inputs = dict(zip(NAMES, batch))
            inputs["labels"] = inputs["labels"].float()
            loss = self.model(**inputs)
            loss.backward(retain_graph=True)
            loss.item()
            self.opt.step()
            self.opt.zero_grad()
            steps += 1
            if max_steps and steps >= max_steps:
                break
        return steps

    def evaluate(self) -> np.ndarray:
        self.model.eval()
        out = []
        with torch.no_grad():
            for batch in self.val_loader:
                inputs = dict(zip(NAMES, batch))
                inputs["labels"] = inputs["labels"].float()
                out.append(torch.sigmoid(self.model(**inputs)).numpy())
        return np.concatenate(out)

    def epoch(self) -> int:
        steps = self.train_steps()
        self.evaluate()
        return steps
