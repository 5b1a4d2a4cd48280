"""Why accuracy under pruning trailed answer-region recall on the v1 embedded model (data/tiny-llava-shapes-v1;
the finding that led to the v2 model, trained on pruned, compacted prompts: data/README.md).

The tokens `svd` keeps (layer -2 features, budget K) on 240 ShapesVQA test questions, answered by the v1
tiny LLaVA (greedy first token, fast path of `svdprune_utils.testbed.tiny`) three ways: "compact" = kept tokens at
consecutive positions (what `patch_llava` does), "fullpos" = at their positions in the 576-token prompt,
"fullpos+bgw" = also with each kept background token standing for the dropped ones (`tiny._background_mask`).
Run: OMP_NUM_THREADS=2 python results/pruned_positions.py  (about 1 min on 2 cores; output in
results/pruned_positions.txt)
"""
import numpy as np
import torch

import svdprune_utils as sp
from svdprune_utils.testbed import shapes as S
from svdprune_utils.testbed import tiny as T

torch.set_num_threads(2)
m, _ = T.load_tiny(T.V1_PATH); m.set_attn_implementation('eager')
ds = S.ShapesVQA('test', n=240, seed=0); enc = T._Encoded(ds)
v = T.vocab(); img_id = v['<image>']; inv = {i: w for w, i in v.items()}
res = {}
with torch.no_grad():
    for b in range(0, 240, 48):
        pv, dense, _, qas, regions = T._collate([enc[i] for i in range(b, b + 48)])
        X = T.vision_features(m, pv)[:, 1:]
        feats = m.model.multi_modal_projector(X)
        ids, mask = T.encode_ids([q[0][0] for q in qas])
        qtypes = [ds[b + j]['qtype'] for j in range(len(qas))]
        for K in (128, 64, 16):
            kept = sp.select_tokens(X, K, 'svd')
            x = sp.keep_image_tokens({'input_ids': ids, 'attention_mask': mask}, kept, image_mask=ids == img_id,
                                     tokens_per_image=576, positions='original', pad_token_id=v['<pad>'])
            i2, m2, posfull = x['input_ids'], x['attention_mask'], x['position_ids']
            f = feats.gather(1, kept[..., None].expand(-1, -1, feats.shape[-1]))
            emb = T.embed_inputs(m, i2, f)
            for name, pos, am in (('compact', None, m2), ('fullpos', posfull, m2),
                                  ('fullpos+bgw', posfull, T._background_mask(i2, m2, dense, kept, img_id))):
                lg = m(inputs_embeds=emb, attention_mask=am, position_ids=pos).logits[:, -1]
                for j, p in enumerate(lg.argmax(-1)):
                    res.setdefault((K, name, qtypes[j]), []).append(inv[int(p)] == qas[j][0][1])
import pandas as pd

rows = [dict(K=k, mode=n, qtype=q, acc=np.mean(h)) for (k, n, q), h in res.items()]
t = pd.DataFrame(rows).pivot_table(index=['K', 'mode'], columns='qtype', values='acc')
t['overall'] = t.mean(axis=1)
print(t.round(2).to_string())
