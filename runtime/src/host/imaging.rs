//! `amicus:train/imaging`: series as volumes, label masks and patches, from the files the index
//! lists for a series (never a path the guest names), within the run's memory.

use super::bindings::amicus::train::{imaging, types};
use super::{HostState, HostTensor};
use crate::sandbox::guest_text;
use amicus_bundle::Capability;
use wasmtime::component::Resource;

impl HostState {
    /// Bytes left in the run's memory budget for host tensors.
    fn memory_left(&self) -> u64 {
        (self
            .memory
            .cap
            .saturating_sub(self.memory.linear + self.memory.host)) as u64
    }

    /// Record an imaging call for the audit log and turn an imaging error into the contract's.
    fn imaging_call<T>(
        &mut self,
        call: &str,
        detail: String,
        result: Result<T, amicus_imaging::ImagingError>,
    ) -> Result<T, types::Error> {
        use amicus_imaging::ImagingError as E;
        let answer = result.map_err(|e| {
            let reason = e.to_string();
            match e {
                E::TooLarge { .. } => types::Error::LimitExceeded(reason),
                E::Unsupported(_) => types::Error::NotAvailable(reason),
                E::UnknownSeries(_) | E::NoLabel(_) | E::InvalidRequest(_) => {
                    types::Error::InvalidArgument(reason)
                }
                E::BadFile { .. } | E::Inconsistent(_) => types::Error::Failed(reason),
            }
        });
        self.record(Capability::Imaging, call, detail, None, answer)
    }

    /// Apply the load options the contract offers to a volume of series `series_uid`, in the
    /// documented order: resample, keep slices, crop/pad, window, z-score.
    fn apply_options(
        &self,
        series_uid: &str,
        mut volume: amicus_imaging::Volume,
        options: &imaging::LoadOptions,
        is_mask: bool,
    ) -> Result<amicus_imaging::Volume, amicus_imaging::ImagingError> {
        use amicus_imaging::ImagingError as E;
        // The series' own grid, on which labels are drawn.
        let series_grid = volume.geometry.clone();
        if let Some((x, y, z)) = options.spacing {
            volume = amicus_imaging::resample(&volume, [x, y, z], is_mask, self.memory_left())?;
        }
        if let Some(r) = options.slices {
            volume = amicus_imaging::select_slices(&volume, r.first as usize, r.count as usize)?;
        }
        match (options.size, &options.centre) {
            (None, None) => {}
            (None, Some(_)) => {
                return Err(E::InvalidRequest("a crop centre needs a size".into()));
            }
            (Some((x, y, z)), centre) => {
                let size = [x as usize, y as usize, z as usize];
                let fill = if is_mask {
                    0.0
                } else {
                    volume.data.iter().copied().fold(f32::INFINITY, f32::min)
                };
                volume = match centre {
                    None => amicus_imaging::crop_or_pad(&volume, size, fill, self.memory_left())?,
                    Some(c) => {
                        let point = match c {
                            imaging::CropCentre::Point((x, y, z)) => [*x, *y, *z],
                            imaging::CropCentre::LabelBox(label) => {
                                let mask = self.label_mask(series_uid, label, &series_grid)?;
                                let centre =
                                    amicus_imaging::label_box_centre(&mask).ok_or_else(|| {
                                        E::NoLabel(format!(
                                            "{}: the label is empty on this series",
                                            label_text(label)
                                        ))
                                    })?;
                                mask.geometry.to_patient(centre)
                            }
                        };
                        let centre = volume.geometry.to_voxel(point);
                        amicus_imaging::crop_or_pad_around(
                            &volume,
                            size,
                            centre,
                            fill,
                            self.memory_left(),
                        )?
                    }
                };
            }
        }
        if let (Some(w), false) = (options.window, is_mask) {
            amicus_imaging::apply_window(
                &mut volume,
                amicus_imaging::Window {
                    center: w.center,
                    width: w.width,
                },
            )?;
        }
        if options.z_score && !is_mask {
            amicus_imaging::z_score(&mut volume);
        }
        Ok(volume)
    }

    /// Hand `data` with `shape` to the guest as a tensor, within the run's memory.
    fn push_tensor(
        &mut self,
        shape: Vec<u32>,
        data: Vec<f32>,
    ) -> Result<Resource<HostTensor>, amicus_imaging::ImagingError> {
        use amicus_imaging::ImagingError as E;
        let bytes = data.len() * 4;
        if !self.memory.reserve_host(bytes) {
            return Err(E::TooLarge {
                needed: bytes as u64,
                available: self.memory_left(),
            });
        }
        self.table
            .push(HostTensor { shape, data })
            .map_err(|e| E::Unsupported(format!("tensor table: {e}")))
    }

    /// Apply the options, then hand the volume over as a tensor.
    fn deliver(
        &mut self,
        series_uid: &str,
        volume: amicus_imaging::Volume,
        options: &imaging::LoadOptions,
        is_mask: bool,
    ) -> Result<imaging::Volume, amicus_imaging::ImagingError> {
        let volume = self.apply_options(series_uid, volume, options, is_mask)?;
        let [z, y, x] = volume.shape();
        let g = volume.geometry;
        let tensor = self.push_tensor(vec![z as u32, y as u32, x as u32], volume.data)?;
        Ok(imaging::Volume {
            data: tensor,
            geometry: imaging::Geometry {
                origin: (g.origin[0], g.origin[1], g.origin[2]),
                spacing: (g.spacing[0], g.spacing[1], g.spacing[2]),
                direction: g.direction.iter().flatten().copied().collect(),
            },
        })
    }

    /// The mask of `label` on `geometry`, the grid of series `series_uid`, from the RTSTRUCT
    /// or SEG that references the series (matched through the index, never by guesswork).
    fn label_mask(
        &self,
        series_uid: &str,
        label: &imaging::LabelSource,
        geometry: &amicus_imaging::Geometry,
    ) -> Result<amicus_imaging::Volume, amicus_imaging::ImagingError> {
        let state = self.imaging.as_ref().expect("checked by the caller");
        let (modality, name) = match label {
            imaging::LabelSource::RtstructRoi(n) => ("RTSTRUCT", n),
            imaging::LabelSource::SegSegment(n) => ("SEG", n),
        };
        let candidates = state.referencing(series_uid, modality);
        let holder = candidates.iter().find(|(_, f)| {
            if modality == "RTSTRUCT" {
                f.roi_names.contains(name)
            } else {
                f.segment_labels.contains(name)
            }
        });
        let Some((path, _)) = holder else {
            return Err(amicus_imaging::ImagingError::NoLabel(format!(
                "{:?} in any {modality} referencing series {}",
                guest_text(name),
                guest_text(series_uid)
            )));
        };
        let needed = geometry.voxels() as u64 * 4;
        if needed > self.memory_left() {
            return Err(amicus_imaging::ImagingError::TooLarge {
                needed,
                available: self.memory_left(),
            });
        }
        if modality == "RTSTRUCT" {
            amicus_imaging::rtstruct::load_roi_mask(path, name, geometry)
        } else {
            amicus_imaging::seg::load_segment_mask(path, name, geometry)
        }
    }

    fn series_files(
        &self,
        uid: &str,
    ) -> Result<Vec<std::path::PathBuf>, amicus_imaging::ImagingError> {
        let state = self.imaging.as_ref().expect("checked by the caller");
        let files = state.series_files(uid);
        if files.is_empty() {
            return Err(amicus_imaging::ImagingError::UnknownSeries(guest_text(uid)));
        }
        Ok(files)
    }
}

fn options_text(o: &imaging::LoadOptions) -> String {
    let centre = match &o.centre {
        None => "-".to_string(),
        Some(imaging::CropCentre::Point(p)) => format!("{p:?}"),
        Some(imaging::CropCentre::LabelBox(l)) => label_text(l),
    };
    format!(
        "spacing={:?} slices={:?} size={:?} centre={centre} window={:?} z-score={}",
        o.spacing,
        o.slices.map(|r| (r.first, r.count)),
        o.size,
        o.window.map(|w| (w.center, w.width)),
        o.z_score
    )
}

/// A label source for the audit log.
fn label_text(label: &imaging::LabelSource) -> String {
    match label {
        imaging::LabelSource::RtstructRoi(n) => format!("RTSTRUCT {:?}", guest_text(n)),
        imaging::LabelSource::SegSegment(n) => format!("SEG {:?}", guest_text(n)),
    }
}

impl imaging::Host for HostState {
    fn load_series(
        &mut self,
        series_uid: String,
        options: imaging::LoadOptions,
    ) -> Result<imaging::Volume, types::Error> {
        self.require(Capability::Imaging, "load-series")?;
        let detail = format!("{} {}", guest_text(&series_uid), options_text(&options));
        if self.imaging.is_none() {
            return Err(self.not_available(
                Capability::Imaging,
                "load-series",
                detail,
                "this station has not indexed its archive (amicus station index)",
            ));
        }
        self.begin(Capability::Imaging, "load-series", &detail);
        let result = self
            .series_files(&series_uid)
            .and_then(|files| amicus_imaging::load_series(&files, self.memory_left()))
            .and_then(|volume| self.deliver(&series_uid, volume, &options, false));
        self.imaging_call("load-series", detail, result)
    }

    fn load_mask(
        &mut self,
        series_uid: String,
        label: imaging::LabelSource,
        options: imaging::LoadOptions,
    ) -> Result<imaging::Volume, types::Error> {
        self.require(Capability::Imaging, "load-mask")?;
        let detail = format!(
            "{} {} {}",
            guest_text(&series_uid),
            label_text(&label),
            options_text(&options)
        );
        if self.imaging.is_none() {
            return Err(self.not_available(
                Capability::Imaging,
                "load-mask",
                detail,
                "this station has not indexed its archive (amicus station index)",
            ));
        }
        self.begin(Capability::Imaging, "load-mask", &detail);
        let result = self
            .series_files(&series_uid)
            .and_then(|files| amicus_imaging::series_geometry(&files))
            .and_then(|grid| self.label_mask(&series_uid, &label, &grid))
            .and_then(|mask| self.deliver(&series_uid, mask, &options, true));
        self.imaging_call("load-mask", detail, result)
    }

    fn sample_patches(
        &mut self,
        series_uid: String,
        label: imaging::LabelSource,
        options: imaging::LoadOptions,
        request: imaging::PatchRequest,
    ) -> Result<imaging::Patches, types::Error> {
        use amicus_imaging::ImagingError as E;
        self.require(Capability::Imaging, "sample-patches")?;
        let (x, y, z) = request.size;
        let detail = format!(
            "{} {} {} size=({x}, {y}, {z}) count={} foreground={} seed={}",
            guest_text(&series_uid),
            label_text(&label),
            options_text(&options),
            request.count,
            request.foreground_fraction,
            request.seed
        );
        if self.imaging.is_none() {
            return Err(self.not_available(
                Capability::Imaging,
                "sample-patches",
                detail,
                "this station has not indexed its archive (amicus station index)",
            ));
        }
        self.begin(Capability::Imaging, "sample-patches", &detail);
        let result = (|| {
            if options.slices.is_some() || options.size.is_some() || options.centre.is_some() {
                return Err(E::InvalidRequest(
                    "sample-patches takes the patch size from the request; leave the options' \
                     slices, size and centre unset"
                        .into(),
                ));
            }
            let files = self.series_files(&series_uid)?;
            let image = amicus_imaging::load_series(&files, self.memory_left())?;
            // The mask is drawn on the image's own grid: no second pass over the headers.
            let mask = self.label_mask(&series_uid, &label, &image.geometry)?;
            let image = self.apply_options(&series_uid, image, &options, false)?;
            let mask = self.apply_options(&series_uid, mask, &options, true)?;
            let fill = image.data.iter().copied().fold(f32::INFINITY, f32::min);
            let wanted = amicus_imaging::PatchRequest {
                size: [x as usize, y as usize, z as usize],
                count: request.count as usize,
                foreground_fraction: request.foreground_fraction,
                seed: request.seed,
            };
            let p =
                amicus_imaging::sample_patches(&image, &mask, &wanted, fill, self.memory_left())?;
            drop((image, mask));
            // Both tensors or neither: a refused second one must not strand the first.
            let needed = ((p.images.len() + p.masks.len()) * 4) as u64;
            if needed > self.memory_left() {
                return Err(E::TooLarge {
                    needed,
                    available: self.memory_left(),
                });
            }
            let shape = vec![request.count, z, y, x];
            let images = self.push_tensor(shape.clone(), p.images)?;
            let masks = self.push_tensor(shape, p.masks)?;
            Ok(imaging::Patches {
                images,
                masks,
                centres: p
                    .centres
                    .iter()
                    .map(|(c, foreground)| imaging::PatchCentre {
                        voxel: (c[0] as u32, c[1] as u32, c[2] as u32),
                        foreground: *foreground,
                    })
                    .collect(),
            })
        })();
        self.imaging_call("sample-patches", detail, result)
    }
}
